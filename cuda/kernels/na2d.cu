// na2d.cu: 2-D neighbourhood attention with NATTEN's window rule (no dilation, not causal),
// forward and backward, as the CPU reference ops/src/na2d.rs defines it.
//
// Layout: q, k, v, out and their gradients are [maps, X, Y, D] (maps = B * H, token (x, y) of map
// m at ((m * X + x) * Y + y) * D); the per-query log-sum-exp `lse` (natural log, saved by the
// forward) and `delta` = dO . out (written by the dq kernel for the dk/dv kernel) are f32
// [maps, X, Y].
//
// Window rule per axis of extent n, odd kernel k <= n: query i sees keys start(i) .. start(i) + k
// with start(i) = clamp(i - k/2, 0, n - k); the queries that see key j are the contiguous range
// inv_lo(j) .. inv_hi(j) (na_inv_lo / na_inv_hi, the exact inverse). With s_tj = scale q_t . k_j:
//   forward:  p_t = softmax_{j in W(t)}(s_t), out_t = sum_j p_tj v_j, lse_t = log sum_j exp(s_tj)
//   backward: p_tj = exp(s_tj - lse_t), delta_t = dO_t . out_t, ds_tj = p_tj (dO_t . v_j - delta_t)
//             dq_t = scale sum_{j in W(t)} ds_tj k_j                 (gathered per query)
//             dk_j = scale sum_{t : j in W(t)} ds_tj q_t, dv_j = sum_t p_tj dO_t  (gathered per
//             key over its inverse window)
// Every output element has exactly one writer: no atomics, no zero fill, deterministic.
// No [L, L] score matrix exists anywhere: scores live in registers.
//
// Three variants of each of the three kernels (forward; dq + delta; dk + dv), chosen by the host:
// - naive (`*_naive_<f32|bf16>`): one thread per (token, dim), direct loops over the window
//   (forward, dq) or the inverse window (dk, dv), every dot product recomputed. The reference the
//   tiled variants are checked against on the GPU; any D.
// - simt (`*_simt_<f32|bf16>_d<D>`, D in 16, 32, 48, 64): tiled, f32 math on CUDA cores.
// - mma (`*_mma_bf16_d<D>`, D a multiple of 16 up to 128): tiled, bf16 tensor cores
//   (mma.sync m16n8k16, f32 accumulation), bf16 only.
//
// Tiled decomposition (simt and mma): a warp owns a tile of 16 tokens, 16 consecutive columns
// y0 .. y0 + 16 of one map row; a block of NA_WARPS warps owns NA_WARPS consecutive rows of the
// same columns (blocks grid-stride over the maps * row tiles * column tiles). The block stages
// through shared memory the union of what its warps read, row by row:
// - forward and dq (per query): the key rows start(x0) .. start(x_last) + k and key columns
//   start(y0) .. start(y_last) + k (at most 16 + k - 1 columns, padded to whole chunks of 16;
//   columns past Y are zero) of K and V;
// - dk/dv (per key): the query rows inv_lo(x0) .. inv_hi(x_last) and columns inv_lo(y0) ..
//   inv_hi(y_last) (at most 14 + 2k columns) of Q and dO, with their lse and delta; the mma
//   variant also stages the block's own K and V (its A operands, re-read per chunk instead of
//   held in registers), the simt variant keeps each lane's key and value in registers.
// When the rows do not fit the shared-memory budget the host picks `rows` per stage and the block
// loops over stages. The ring kernels (`*_ring_mma_bf16_d<D>`, NaGeom::ring > 0; see "ring
// staging" below) instead walk several such tiles down a 16-column strip of a map, each staged
// row kept in a ring of shared-memory slots for every tile that reads it, and the next tile's
// rows in flight while a tile computes; per warp they compute exactly what the mma tiles do.
// The mma variant's cp.async staging takes a fast path when a staged row is
// a whole number of the block's 16-byte pieces (MVAR's maps at D = 64: one 16-column row is 128
// pieces): each thread's pieces then sit at fixed columns of every row. A warp then walks the staged rows its tokens need (its window rows, or its
// inverse-window rows) in chunks of 16 staged columns: one 16 x 16 block of scores per chunk,
// masked to each token's own window (columns outside it get -inf, i.e. p = 0; in dk/dv the
// queries that see a key column are one contiguous range, so a compare each), an online softmax
// (forward) or the recomputed p = exp(s - lse) (backward), then the products with V, K, dO or Q
// of the chunk. Every query sees at least one key, so no softmax row is empty.
// - simt lanes: lane = 2 * r + h owns tile token r and the half h of the head dimension (float4
//   numbers i with i % 2 == h, so a warp's two halves read adjacent 16 bytes: staged rows are
//   read as broadcasts); partial dot products meet through one shuffle, after which both halves
//   hold the token's 16 scores of the chunk; the softmax state is per lane.
// - mma lanes: the usual m16n8k16 fragments (g = lane / 4 owns tile rows g and g + 8, t = lane % 4
//   owns columns 2t, 2t + 1 of each 8-column block); ldmatrix (.trans for the operands whose
//   reduction runs over tokens) feeds the staged rows; a chunk's probabilities go from the
//   accumulator layout straight into the A operand of the next product (rounded to bf16, as
//   FlashAttention does); row statistics are reduced over the 4 lanes of a row.
//
// Numerics: f32 throughout (bf16 widened on load, rounded once on store); softmax in base 2 with
// the logits pre-multiplied by scale * log2(e); the saved lse is natural-log. The mma variant
// additionally rounds p and ds to bf16 as tensor-core operands, computes 2^x with ex2.approx
// (mma_exp2), and in the forward lets a row's running max lag its true max by up to
// NA_RESCALE_SLACK log2 units (O is rescaled only past that; the softmax is the same).

#define NA_TILE 16
#define NA_WARPS 4
#define NA_THREADS (NA_WARPS * 32)
#define NA_LOG2E 1.4426950408889634f
#define NA_LN2 0.6931471805599453f
#define NA_FULL 0xffffffffu
// How far (log2 units) a chunk's score max may pass the mma forward's running max before O is
// rescaled to it: probabilities stay below 2^8, far inside f32 and bf16 range.
#define NA_RESCALE_SLACK 8.0f
// Unroll of the simt dq kernel's per-key loop (registers hold one key's rows per step; the dk/dv
// kernel, which holds four rows per lane already, does not unroll).
#define NA_SIMT_UNROLL 2
// Blocks per multiprocessor the mma kernels are compiled for (__launch_bounds__: registers per
// thread at most 64 K / (128 * blocks)): as many as compile without spills on sm_80 and sm_90.
// The host sizes their shared memory to the same count (mma_blocks_per_sm in
// cuda/src/ops/na2d.rs, which a test holds to these lines). D is always a literal here: no
// parentheses around it, which the emulator's scan of __launch_bounds__ cannot take nested twice.
#define NA_MMA_FWD_BLOCKS(D) (D <= 80 ? 4 : D <= 112 ? 3 : 2)
#define NA_MMA_DQ_BLOCKS(D) (D <= 48 ? 4 : D <= 80 ? 3 : 2)
#define NA_MMA_DKDV_BLOCKS(D) (D <= 80 ? 3 : 2)
// The ring-staged kernels of each pass are compiled for the same counts (none spills there).

// Timing diagnostics of the mma kernels (`NaDiag` in cuda/src/ops/na2d.rs; benches only, the
// results are wrong by design): a kernel with one part left out, so that on a GPU the time of the
// parts and how much they overlap come from differences of wall times, where no profiler can
// read the counters. LOADS_ONLY skips the chunk loops (the staging, the fragment loads of the
// warp's own tokens and the stores stay); NO_LOADS skips the staging into shared memory (zeroed
// once per block instead) and computes on it.
#define NA_DIAG_FULL 0
#define NA_DIAG_LOADS_ONLY 1
#define NA_DIAG_NO_LOADS 2

// Mirrors `Geom` in cuda/src/ops/na2d.rs (repr(C)).
struct NaGeom {
    i64 maps;       // B * H
    int x, y, d;    // map rows, map columns, head dim
    int ks;         // kernel size (odd, <= x and <= y)
    int wx;         // rows (warps) per block tile: NA_WARPS
    int ncw;        // staged columns per row (a multiple of 16), the smem row pitch in tokens
    int rows;       // staged rows per stage
    int xtiles;     // ceil(x / wx)
    int ytiles;     // ceil(y / 16)
    int async_stage;  // mma variant: 1 stages through cp.async, 0 through registers
    int diag;         // mma variant: NA_DIAG_* (0 in every use but the benches' timing twins)
    int ring;         // ring kernels (na2d_*_ring_mma_*): row groups per work item; rows is then
                      // the ring's slot count (0 for every other kernel)
    float scale;       // logit scale
    float scale_log2;  // scale * log2(e)
};

__device__ __forceinline__ int na_start(int i, int n, int k) {
    int s = i - k / 2;
    s = s < 0 ? 0 : s;
    return s > n - k ? n - k : s;
}

// First and one-past-last query whose window holds key j (see ops/src/na2d.rs).
__device__ __forceinline__ int na_inv_lo(int j, int n, int k) { return j < k ? 0 : j - k / 2; }
__device__ __forceinline__ int na_inv_hi(int j, int n, int k) { return j + k >= n ? n : j + k / 2 + 1; }

__device__ __forceinline__ bool na_in_window(int key, int start, int k) { return key >= start && key < start + k; }

// ------------------------------------------------------------------------------------------------
// naive variant

// Decodes a token index into (map, x, y).
__device__ __forceinline__ void na_token(const NaGeom& g, i64 t, i64* m, int* ix, int* iy) {
    i64 plane = (i64)g.x * g.y;
    *m = t / plane;
    i64 rem = t - *m * plane;
    *ix = (int)(rem / g.y);
    *iy = (int)(rem - (i64)(*ix) * g.y);
}

template <typename T>
__device__ __forceinline__ float na_dot(const T* a, const T* b, int d) {
    float s = 0.0f;
    for (int e = 0; e < d; ++e) s += Io<T>::load(a, e) * Io<T>::load(b, e);
    return s;
}

template <typename T>
__device__ void na2d_fwd_naive_impl(T* out, float* lse, const T* q, const T* k, const T* v, NaGeom g) {
    i64 total = g.maps * g.x * g.y * g.d;
    GRID_STRIDE(e, total) {
        i64 t = e / g.d;
        int dd = (int)(e - t * g.d);
        i64 m;
        int ix, iy;
        na_token(g, t, &m, &ix, &iy);
        int sx = na_start(ix, g.x, g.ks), sy = na_start(iy, g.y, g.ks);
        const T* qt = q + t * g.d;
        float mx = NEG_INF;
        for (int a = 0; a < g.ks; ++a)
            for (int b = 0; b < g.ks; ++b) {
                i64 j = (m * g.x + sx + a) * g.y + sy + b;
                mx = fmaxf(mx, g.scale * na_dot(qt, k + j * g.d, g.d));
            }
        float sum = 0.0f, acc = 0.0f;
        for (int a = 0; a < g.ks; ++a)
            for (int b = 0; b < g.ks; ++b) {
                i64 j = (m * g.x + sx + a) * g.y + sy + b;
                float p = expf(g.scale * na_dot(qt, k + j * g.d, g.d) - mx);
                sum += p;
                acc += p * Io<T>::load(v, j * g.d + dd);
            }
        Io<T>::store(out, e, acc / sum);
        if (dd == 0) lse[t] = mx + logf(sum);
    }
}

// dq and delta: one thread per (query, dim); the dim-0 thread also writes delta.
template <typename T>
__device__ void na2d_dq_naive_impl(T* dq, float* delta, const T* q, const T* k, const T* v, const T* o,
                                   const T* go, const float* lse, NaGeom g) {
    i64 total = g.maps * g.x * g.y * g.d;
    GRID_STRIDE(e, total) {
        i64 t = e / g.d;
        int dd = (int)(e - t * g.d);
        i64 m;
        int ix, iy;
        na_token(g, t, &m, &ix, &iy);
        int sx = na_start(ix, g.x, g.ks), sy = na_start(iy, g.y, g.ks);
        const T* qt = q + t * g.d;
        const T* gt = go + t * g.d;
        float dl = na_dot(gt, o + t * g.d, g.d);
        float l = lse[t];
        float acc = 0.0f;
        for (int a = 0; a < g.ks; ++a)
            for (int b = 0; b < g.ks; ++b) {
                i64 j = (m * g.x + sx + a) * g.y + sy + b;
                float p = expf(g.scale * na_dot(qt, k + j * g.d, g.d) - l);
                float ds = p * (na_dot(gt, v + j * g.d, g.d) - dl);
                acc += ds * Io<T>::load(k, j * g.d + dd);
            }
        Io<T>::store(dq, e, g.scale * acc);
        if (dd == 0) delta[t] = dl;
    }
}

// dk and dv: one thread per (key, dim), over the queries whose window holds the key.
template <typename T>
__device__ void na2d_dkdv_naive_impl(T* dk, T* dv, const T* q, const T* k, const T* v, const T* go,
                                     const float* lse, const float* delta, NaGeom g) {
    i64 total = g.maps * g.x * g.y * g.d;
    GRID_STRIDE(e, total) {
        i64 j = e / g.d;
        int dd = (int)(e - j * g.d);
        i64 m;
        int jx, jy;
        na_token(g, j, &m, &jx, &jy);
        const T* kj = k + j * g.d;
        const T* vj = v + j * g.d;
        int xlo = na_inv_lo(jx, g.x, g.ks), xhi = na_inv_hi(jx, g.x, g.ks);
        int ylo = na_inv_lo(jy, g.y, g.ks), yhi = na_inv_hi(jy, g.y, g.ks);
        float ak = 0.0f, av = 0.0f;
        for (int ix = xlo; ix < xhi; ++ix)
            for (int iy = ylo; iy < yhi; ++iy) {
                i64 t = (m * g.x + ix) * g.y + iy;
                const T* gt = go + t * g.d;
                float p = expf(g.scale * na_dot(q + t * g.d, kj, g.d) - lse[t]);
                float ds = p * (na_dot(gt, vj, g.d) - delta[t]);
                av += p * Io<T>::load(gt, dd);
                ak += ds * Io<T>::load(q, t * g.d + dd);
            }
        Io<T>::store(dk, e, g.scale * ak);
        Io<T>::store(dv, e, av);
    }
}

// ------------------------------------------------------------------------------------------------
// tiling shared by the simt and mma variants

#ifdef MVAR_CUDA_EMU
// The CPU emulator (cuda/emu) gives each launch one dynamic shared buffer.
#define na_smem (mvar_emu::g_launch->dyn_smem)
#else
extern __shared__ __align__(16) unsigned char na_smem[];
#endif

// One block tile: map, first row, first column; and the derived spans.
struct NaTile {
    i64 map;
    int x0, y0;  // first row and column of the block's tokens
    int xl, yl;  // last valid row and column of the block's tokens
};

__device__ __forceinline__ NaTile na_tile(const NaGeom& g, i64 t) {
    i64 per = (i64)g.xtiles * g.ytiles;
    NaTile tl;
    tl.map = t / per;
    int rem = (int)(t - tl.map * per);
    int xt = rem / g.ytiles, yt = rem - xt * g.ytiles;
    tl.x0 = xt * g.wx;
    tl.y0 = yt * NA_TILE;
    tl.xl = min(tl.x0 + g.wx, g.x) - 1;
    tl.yl = min(tl.y0 + NA_TILE, g.y) - 1;
    return tl;
}

__device__ __forceinline__ i64 na_tiles(const NaGeom& g) { return g.maps * g.xtiles * g.ytiles; }

template <typename T> struct Vec4;
template <> struct Vec4<float> {
    static __device__ __forceinline__ float4 load(const float* p) { return *reinterpret_cast<const float4*>(p); }
    static __device__ __forceinline__ void store(float* p, float4 v) { *reinterpret_cast<float4*>(p) = v; }
};
template <> struct Vec4<bf16_t> {
    static __device__ __forceinline__ float4 load(const bf16_t* p) {
        uint2 u = *reinterpret_cast<const uint2*>(p);
        return make_float4(__uint_as_float(u.x << 16), __uint_as_float(u.x & 0xffff0000u),
                           __uint_as_float(u.y << 16), __uint_as_float(u.y & 0xffff0000u));
    }
    static __device__ __forceinline__ void store(bf16_t* p, float4 v) {
        uint2 u;
        u.x = (unsigned)f32_to_bf16(v.x) | ((unsigned)f32_to_bf16(v.y) << 16);
        u.y = (unsigned)f32_to_bf16(v.z) | ((unsigned)f32_to_bf16(v.w) << 16);
        *reinterpret_cast<uint2*>(p) = u;
    }
};

__device__ __forceinline__ float4 f4_zero() { return make_float4(0.0f, 0.0f, 0.0f, 0.0f); }
__device__ __forceinline__ float f4_dot(float4 a, float4 b) { return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w; }
__device__ __forceinline__ void f4_axpy(float4& acc, float s, float4 b) {
    acc.x += s * b.x;
    acc.y += s * b.y;
    acc.z += s * b.z;
    acc.w += s * b.w;
}
__device__ __forceinline__ float4 f4_scale(float4 a, float s) { return make_float4(a.x * s, a.y * s, a.z * s, a.w * s); }

// Stages rows r0 .. r0 + nr, columns c0 .. c0 + ncols of one [X, Y, D] map into f32 shared memory
// [nr][pitch][D] (token pitch `pitch` >= ncols); columns past Y are zero. Whole block.
template <typename T, int D>
__device__ __forceinline__ void na_stage_f32(float* dst, const T* map, int r0, int nr, int c0, int ncols, int pitch,
                                             int y) {
    const int V = D / 4;
    int total = nr * ncols * V;
    // Unrolled so that each thread has several loads in flight before its first store.
#pragma unroll 4
    for (int e = threadIdx.x; e < total; e += blockDim.x) {
        int vi = e % V, tok = e / V;
        int c = tok % ncols, r = tok / ncols;
        int col = c0 + c;
        float4 val = f4_zero();
        if (col < y) val = Vec4<T>::load(map + ((i64)(r0 + r) * y + col) * D + 4 * vi);
        *reinterpret_cast<float4*>(dst + ((i64)r * pitch + c) * D + 4 * vi) = val;
    }
}

// Same for bf16 staged as raw bits, row pitch D + 8 elements (keeps ldmatrix conflict-free).
template <int D>
__device__ __forceinline__ void na_stage_bf16(bf16_t* dst, const bf16_t* map, int r0, int nr, int c0, int ncols,
                                              int pitch, int y) {
    const int V = D / 8;
    int total = nr * ncols * V;
    // Unrolled so that each thread has several loads in flight before its first store.
#pragma unroll 4
    for (int e = threadIdx.x; e < total; e += blockDim.x) {
        int vi = e % V, tok = e / V;
        int c = tok % ncols, r = tok / ncols;
        int col = c0 + c;
        uint4 val = make_uint4(0u, 0u, 0u, 0u);
        if (col < y) val = *reinterpret_cast<const uint4*>(map + ((i64)(r0 + r) * y + col) * D + 8 * vi);
        *reinterpret_cast<uint4*>(dst + ((i64)r * pitch + c) * (D + 8) + 8 * vi) = val;
    }
}

// Stages the per-query statistics of the same rows/columns: lse (times log2 e) and delta, zero
// past Y.
__device__ __forceinline__ void na_stage_stats(float* ls, float* ds, const float* lse, const float* delta, int r0,
                                               int nr, int c0, int ncols, int pitch, int y) {
    if (NA_THREADS % ncols == 0 && blockDim.x == NA_THREADS) {
        // A row is a whole fraction of the block (MVAR's maps: 16 columns, 8 rows a pass): each
        // thread keeps one column, so no division per element and the address steps by a row.
        const int c = threadIdx.x % ncols, col = c0 + c, rstep = NA_THREADS / ncols;
        const bool inside = col < y;
        int r = threadIdx.x / ncols;
        i64 t = (i64)(r0 + r) * y + col;
        for (; r < nr; r += rstep, t += (i64)rstep * y) {
            float l = 0.0f, dl = 0.0f;
            if (inside) {
                l = lse[t] * NA_LOG2E;
                dl = delta[t];
            }
            ls[r * pitch + c] = l;
            ds[r * pitch + c] = dl;
        }
        return;
    }
    int total = nr * ncols;
    for (int e = threadIdx.x; e < total; e += blockDim.x) {
        int c = e % ncols, r = e / ncols;
        int col = c0 + c;
        float l = 0.0f, dl = 0.0f;
        if (col < y) {
            i64 t = (i64)(r0 + r) * y + col;
            l = lse[t] * NA_LOG2E;
            dl = delta[t];
        }
        ls[r * pitch + c] = l;
        ds[r * pitch + c] = dl;
    }
}

// ------------------------------------------------------------------------------------------------
// simt variant

// Forward. Shared memory: K and V stages, f32 [rows][ncw][D] each.
template <typename T, int D>
__device__ void na2d_fwd_simt_impl(T* out, float* lse, const T* q, const T* k, const T* v, NaGeom g) {
    const int H = D / 8;  // float4s per lane
    float* ks = reinterpret_cast<float*>(na_smem);
    float* vs = ks + (i64)g.rows * g.ncw * D;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int tr = lane >> 1, h = lane & 1;
    i64 plane = (i64)g.x * g.y;
    for (i64 it = blockIdx.x; it < na_tiles(g); it += gridDim.x) {
        NaTile tl = na_tile(g, it);
        int rlo = na_start(tl.x0, g.x, g.ks), rhi = na_start(tl.xl, g.x, g.ks) + g.ks;
        int c0 = na_start(tl.y0, g.y, g.ks);
        int nch = (na_start(tl.yl, g.y, g.ks) + g.ks - c0 + NA_TILE - 1) / NA_TILE;
        const T* kmap = k + tl.map * plane * D;
        const T* vmap = v + tl.map * plane * D;
        int x = tl.x0 + warp;
        bool active = x < g.x;  // warp-uniform
        int wlo = active ? na_start(x, g.x, g.ks) : 0, whi = active ? wlo + g.ks : 0;
        int y = tl.y0 + tr;
        bool ok = active && y < g.y;
        int sy = na_start(min(y, g.y - 1), g.y, g.ks);
        i64 tq = tl.map * plane + (i64)min(x, g.x - 1) * g.y + min(y, g.y - 1);
        float4 qv[H], ov[H];
#pragma unroll
        for (int i = 0; i < H; ++i) {
            qv[i] = ok ? f4_scale(Vec4<T>::load(q + tq * D + 8 * i + 4 * h), g.scale_log2) : f4_zero();
            ov[i] = f4_zero();
        }
        float mrow = NEG_INF, lrow = 0.0f;
        for (int r0 = rlo; r0 < rhi; r0 += g.rows) {
            int nr = min(g.rows, rhi - r0);
            __syncthreads();
            na_stage_f32<T, D>(ks, kmap, r0, nr, c0, nch * NA_TILE, g.ncw, g.y);
            na_stage_f32<T, D>(vs, vmap, r0, nr, c0, nch * NA_TILE, g.ncw, g.y);
            __syncthreads();
            if (!active) continue;
            int ra = max(r0, wlo), rb = min(r0 + nr, whi);
            for (int r = ra; r < rb; ++r) {
                for (int ch = 0; ch < nch; ++ch) {
                    i64 off = ((i64)(r - r0) * g.ncw + ch * NA_TILE) * D + 4 * h;
                    const float* kc = ks + off;
                    const float* vc = vs + off;
                    float s[NA_TILE];
#pragma unroll
                    for (int c = 0; c < NA_TILE; ++c) {
                        float acc = 0.0f;
#pragma unroll
                        for (int i = 0; i < H; ++i)
                            acc += f4_dot(qv[i], *reinterpret_cast<const float4*>(kc + c * D + 8 * i));
                        s[c] = acc;
                    }
                    float cm = NEG_INF;
                    int cb = c0 + ch * NA_TILE;
#pragma unroll
                    for (int c = 0; c < NA_TILE; ++c) {
                        s[c] += __shfl_xor_sync(NA_FULL, s[c], 1);
                        s[c] = na_in_window(cb + c, sy, g.ks) ? s[c] : NEG_INF;
                        cm = fmaxf(cm, s[c]);
                    }
                    float mn = fmaxf(mrow, cm);
                    float mu = mn == NEG_INF ? 0.0f : mn;
                    float alpha = exp2f(mrow - mu);
                    mrow = mn;
                    lrow *= alpha;
#pragma unroll
                    for (int i = 0; i < H; ++i) ov[i] = f4_scale(ov[i], alpha);
#pragma unroll
                    for (int c = 0; c < NA_TILE; ++c) {
                        float p = exp2f(s[c] - mu);
                        lrow += p;
#pragma unroll
                        for (int i = 0; i < H; ++i)
                            f4_axpy(ov[i], p, *reinterpret_cast<const float4*>(vc + c * D + 8 * i));
                    }
                }
            }
        }
        if (ok) {
            float inv = 1.0f / lrow;
#pragma unroll
            for (int i = 0; i < H; ++i) Vec4<T>::store(out + tq * D + 8 * i + 4 * h, f4_scale(ov[i], inv));
            if (h == 0) lse[tq] = (mrow + log2f(lrow)) * NA_LN2;
        }
    }
}

// dq and delta. Shared memory as the forward.
template <typename T, int D>
__device__ void na2d_dq_simt_impl(T* dq, float* delta, const T* q, const T* k, const T* v, const T* o, const T* go,
                                  const float* lse, NaGeom g) {
    const int H = D / 8;
    float* ks = reinterpret_cast<float*>(na_smem);
    float* vs = ks + (i64)g.rows * g.ncw * D;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int tr = lane >> 1, h = lane & 1;
    i64 plane = (i64)g.x * g.y;
    for (i64 it = blockIdx.x; it < na_tiles(g); it += gridDim.x) {
        NaTile tl = na_tile(g, it);
        int rlo = na_start(tl.x0, g.x, g.ks), rhi = na_start(tl.xl, g.x, g.ks) + g.ks;
        int c0 = na_start(tl.y0, g.y, g.ks);
        int nch = (na_start(tl.yl, g.y, g.ks) + g.ks - c0 + NA_TILE - 1) / NA_TILE;
        const T* kmap = k + tl.map * plane * D;
        const T* vmap = v + tl.map * plane * D;
        int x = tl.x0 + warp;
        bool active = x < g.x;
        int wlo = active ? na_start(x, g.x, g.ks) : 0, whi = active ? wlo + g.ks : 0;
        int y = tl.y0 + tr;
        bool ok = active && y < g.y;
        int sy = na_start(min(y, g.y - 1), g.y, g.ks);
        i64 tq = tl.map * plane + (i64)min(x, g.x - 1) * g.y + min(y, g.y - 1);
        float4 qv[H], gv[H], dqv[H];
        float dl = 0.0f;
#pragma unroll
        for (int i = 0; i < H; ++i) {
            i64 at = tq * D + 8 * i + 4 * h;
            qv[i] = ok ? f4_scale(Vec4<T>::load(q + at), g.scale_log2) : f4_zero();
            gv[i] = ok ? Vec4<T>::load(go + at) : f4_zero();
            if (ok) dl += f4_dot(gv[i], Vec4<T>::load(o + at));
            dqv[i] = f4_zero();
        }
        dl += __shfl_xor_sync(NA_FULL, dl, 1);
        float l2 = ok ? lse[tq] * NA_LOG2E : 0.0f;
        for (int r0 = rlo; r0 < rhi; r0 += g.rows) {
            int nr = min(g.rows, rhi - r0);
            __syncthreads();
            na_stage_f32<T, D>(ks, kmap, r0, nr, c0, nch * NA_TILE, g.ncw, g.y);
            na_stage_f32<T, D>(vs, vmap, r0, nr, c0, nch * NA_TILE, g.ncw, g.y);
            __syncthreads();
            if (!active) continue;
            int ra = max(r0, wlo), rb = min(r0 + nr, whi);
            for (int r = ra; r < rb; ++r) {
                for (int ch = 0; ch < nch; ++ch) {
                    i64 off = ((i64)(r - r0) * g.ncw + ch * NA_TILE) * D + 4 * h;
                    const float* kc = ks + off;
                    const float* vc = vs + off;
                    int cb = c0 + ch * NA_TILE;
                    // One key at a time: its K half is used twice (scores, then dq) and kept in
                    // registers in between, which bounds the registers to one key's worth.
#pragma unroll NA_SIMT_UNROLL
                    for (int c = 0; c < NA_TILE; ++c) {
                        float4 kr[H];
                        float as = 0.0f, ap = 0.0f;
#pragma unroll
                        for (int i = 0; i < H; ++i) {
                            kr[i] = *reinterpret_cast<const float4*>(kc + c * D + 8 * i);
                            as += f4_dot(qv[i], kr[i]);
                            ap += f4_dot(gv[i], *reinterpret_cast<const float4*>(vc + c * D + 8 * i));
                        }
                        as += __shfl_xor_sync(NA_FULL, as, 1);
                        ap += __shfl_xor_sync(NA_FULL, ap, 1);
                        float p = na_in_window(cb + c, sy, g.ks) ? exp2f(as - l2) : 0.0f;
                        float ds = p * (ap - dl);
#pragma unroll
                        for (int i = 0; i < H; ++i) f4_axpy(dqv[i], ds, kr[i]);
                    }
                }
            }
        }
        if (ok) {
#pragma unroll
            for (int i = 0; i < H; ++i) Vec4<T>::store(dq + tq * D + 8 * i + 4 * h, f4_scale(dqv[i], g.scale));
            if (h == 0) delta[tq] = dl;
        }
    }
}

// dk and dv. Shared memory: Q and dO stages f32 [rows][ncw][D] each, then lse * log2(e) and delta
// f32 [rows][ncw] each. The warp's own keys and values stay in registers.
template <typename T, int D>
__device__ void na2d_dkdv_simt_impl(T* dk, T* dv, const T* q, const T* k, const T* v, const T* go, const float* lse,
                                    const float* delta, NaGeom g) {
    const int H = D / 8;
    float* qs = reinterpret_cast<float*>(na_smem);
    float* gs = qs + (i64)g.rows * g.ncw * D;
    float* ls = gs + (i64)g.rows * g.ncw * D;
    float* dls = ls + g.rows * g.ncw;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int tr = lane >> 1, h = lane & 1;
    i64 plane = (i64)g.x * g.y;
    for (i64 it = blockIdx.x; it < na_tiles(g); it += gridDim.x) {
        NaTile tl = na_tile(g, it);
        int rlo = na_inv_lo(tl.x0, g.x, g.ks), rhi = na_inv_hi(tl.xl, g.x, g.ks);
        int c0 = na_inv_lo(tl.y0, g.y, g.ks);
        int nch = (na_inv_hi(tl.yl, g.y, g.ks) - c0 + NA_TILE - 1) / NA_TILE;
        i64 mbase = tl.map * plane;
        int x = tl.x0 + warp;
        bool active = x < g.x;
        int ilo = active ? na_inv_lo(x, g.x, g.ks) : 0, ihi = active ? na_inv_hi(x, g.x, g.ks) : 0;
        int y = tl.y0 + tr;
        bool ok = active && y < g.y;
        i64 tk = mbase + (i64)min(x, g.x - 1) * g.y + min(y, g.y - 1);
        float4 kv[H], vv[H], dkv[H], dvv[H];
#pragma unroll
        for (int i = 0; i < H; ++i) {
            i64 at = tk * D + 8 * i + 4 * h;
            kv[i] = ok ? f4_scale(Vec4<T>::load(k + at), g.scale_log2) : f4_zero();
            vv[i] = ok ? Vec4<T>::load(v + at) : f4_zero();
            dkv[i] = f4_zero();
            dvv[i] = f4_zero();
        }
        for (int r0 = rlo; r0 < rhi; r0 += g.rows) {
            int nr = min(g.rows, rhi - r0);
            __syncthreads();
            na_stage_f32<T, D>(qs, q + mbase * D, r0, nr, c0, nch * NA_TILE, g.ncw, g.y);
            na_stage_f32<T, D>(gs, go + mbase * D, r0, nr, c0, nch * NA_TILE, g.ncw, g.y);
            na_stage_stats(ls, dls, lse + mbase, delta + mbase, r0, nr, c0, nch * NA_TILE, g.ncw, g.y);
            __syncthreads();
            if (!active) continue;
            int ra = max(r0, ilo), rb = min(r0 + nr, ihi);
            for (int r = ra; r < rb; ++r) {
                for (int ch = 0; ch < nch; ++ch) {
                    i64 tok = (i64)(r - r0) * g.ncw + ch * NA_TILE;
                    const float* qc = qs + tok * D + 4 * h;
                    const float* gc = gs + tok * D + 4 * h;
                    int cb = c0 + ch * NA_TILE;
                    // One query at a time (see the dq kernel).
#pragma unroll 1
                    for (int c = 0; c < NA_TILE; ++c) {
                        float4 qr[H], gr[H];
                        float as = 0.0f, ap = 0.0f;
#pragma unroll
                        for (int i = 0; i < H; ++i) {
                            qr[i] = *reinterpret_cast<const float4*>(qc + c * D + 8 * i);
                            gr[i] = *reinterpret_cast<const float4*>(gc + c * D + 8 * i);
                            as += f4_dot(kv[i], qr[i]);
                            ap += f4_dot(vv[i], gr[i]);
                        }
                        as += __shfl_xor_sync(NA_FULL, as, 1);
                        ap += __shfl_xor_sync(NA_FULL, ap, 1);
                        int qy = cb + c;
                        bool valid = qy < g.y && na_in_window(y, na_start(min(qy, g.y - 1), g.y, g.ks), g.ks);
                        float p = valid ? exp2f(as - ls[tok + c]) : 0.0f;
                        float ds = p * (ap - dls[tok + c]);
#pragma unroll
                        for (int i = 0; i < H; ++i) {
                            f4_axpy(dvv[i], p, gr[i]);
                            f4_axpy(dkv[i], ds, qr[i]);
                        }
                    }
                }
            }
        }
        if (ok) {
#pragma unroll
            for (int i = 0; i < H; ++i) {
                i64 at = tk * D + 8 * i + 4 * h;
                Vec4<T>::store(dk + at, f4_scale(dkv[i], g.scale));
                Vec4<T>::store(dv + at, dvv[i]);
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// mma variant (bf16 tensor cores, sm_80+; the fragment helpers are in mma.cuh)

#include "mma.cuh"

// Stages like na_stage_bf16 when `async` is 0. Otherwise through cp.async: every 16-byte piece of
// the stage is issued before any lands (a register round trip per piece, as na_stage_bf16 does,
// keeps only its unroll's worth of loads in flight per thread, and the stages of these kernels
// are short, so their time was mostly load latency). The caller lands them with na_stage_land.
template <int D>
__device__ __forceinline__ void na_stage_mma(bf16_t* dst, const bf16_t* map, int r0, int nr, int c0, int ncols,
                                             int pitch, int y, int async) {
    if (!async) {
        na_stage_bf16<D>(dst, map, r0, nr, c0, ncols, pitch, y);
        return;
    }
    const int V = D / 8;
    if (NA_THREADS % V == 0 && (ncols * V) % NA_THREADS == 0) {
        // A staged row is a whole number of the block's pieces (MVAR's maps: one row of 16
        // columns is 128 pieces at D = 64), so a thread's pieces sit at fixed columns, CSTEP
        // apart, in every row: addresses are a row base plus constants, and whether a column
        // lies past Y is known per thread. The general loop below divides its index by the
        // run-time column count and forms 64-bit addresses per piece: about 50 SASS instructions
        // a piece (tools/sass.py), a third of the forward's.
        constexpr int CSTEP = NA_THREADS / V;
        const int per = ncols * V / NA_THREADS, vi = threadIdx.x % V;
        for (int j = 0; j < per; ++j) {
            const int c = threadIdx.x / V + j * CSTEP, col = c0 + c;
            const bool inside = col < y;
            // Columns past Y land as zeros (source size 0) from an address inside the map.
            const bf16_t* src = map + (i64)r0 * y * D + (i64)(inside ? col : 0) * D + 8 * vi;
            bf16_t* to = dst + c * (D + 8) + 8 * vi;
            const i64 src_step = (i64)y * D;
            const int dst_step = pitch * (D + 8);
            // Pointers stepped by additions: `src + r * src_step` was a 64-bit product per row.
            for (int r = 0; r < nr; ++r, src += src_step, to += dst_step) mma_cp_async16(to, src, inside);
        }
        return;
    }
    int total = nr * ncols * V;
    for (int e = threadIdx.x; e < total; e += blockDim.x) {
        int vi = e % V, tok = e / V;
        int c = tok % ncols, r = tok / ncols;
        int col = c0 + c;
        bool inside = col < y;
        // Columns past Y land as zeros (source size 0); their address stays inside the map.
        const bf16_t* src = map + ((i64)(r0 + r) * y + (inside ? col : 0)) * D + 8 * vi;
        mma_cp_async16(dst + ((i64)r * pitch + c) * (D + 8) + 8 * vi, src, inside);
    }
}

// Waits for this thread's cp.async copies (no-op for register staging); a __syncthreads must
// follow before other threads read them.
__device__ __forceinline__ void na_stage_land(int async) {
    if (async) {
        mma_cp_commit();
        mma_cp_wait<0>();
    }
}

// NA_DIAG_NO_LOADS: the block's shared memory (`words` 32-bit words) zeroed once, so that the
// chunk loops compute on fixed values (zero scores: no rescale past the first chunk).
__device__ __forceinline__ void na_diag_zero(void* smem, i64 words) {
    unsigned* w = reinterpret_cast<unsigned*>(smem);
    for (i64 i = threadIdx.x; i < words; i += blockDim.x) w[i] = 0u;
    __syncthreads();
}

// ------------------------------------------------------------------------------------------------
// ring staging of the mma variant (NaGeom::ring > 0)
//
// A block tile above stages every row its 4 warps need and computes only then, so rows are
// staged once per tile they serve (2.1 times over at 16x16, k 7: tiles of 4 rows read 10 key
// rows each) and a block's copies overlap only other blocks' work. With a ring, a block's work
// item is a run of `ring` consecutive row groups (a group: wx rows, what one block tile
// computes) of one 16-column strip of a map, walked top to bottom, and the rows the groups need
// (window rows, or inverse-window rows for dk/dv) pass through `rows` slots of shared memory,
// row r in slot r % rows: each row is staged once per item. While a group computes, the next
// group's rows that fit are already in flight. Per group:
//   barrier (every warp is done with the previous group, whose rows below this group's first
//            row may be overwritten)
//   cp.async group 1: this group's rows not yet staged      cp.async group 2: the prefetch
//   wait_group 1 (group 1 and every earlier one landed), barrier, compute
// The host makes the ring at least as large as any one group's rows (cuda/src/ops/na2d.rs), so
// a copy never lands on a row its own group reads; with one slot per row of two successive
// groups, every group after an item's first finds its rows landed or in flight.

struct NaItem {
    i64 map;
    int y0;        // first column of the strip's tokens
    int c0, nch;   // first staged column, staged chunks of 16 columns
    int g0, g1;    // row groups g0 .. g1 - 1 (group gi: rows gi * wx .. gi * wx + wx - 1)
};

// Work items: maps * ytiles * segments of `ring` groups, below 2^31 (the host plans no more).
__device__ __forceinline__ int na_ring_segments(const NaGeom& g) { return (g.xtiles + g.ring - 1) / g.ring; }
__device__ __forceinline__ int na_ring_items(const NaGeom& g) { return (int)g.maps * g.ytiles * na_ring_segments(g); }

// First and one-past-last staged row of group gi: its queries' window rows (KSIDE false) or its
// keys' inverse-window rows (KSIDE true).
template <bool KSIDE>
__device__ __forceinline__ int na_group_lo(const NaGeom& g, int gi) {
    return KSIDE ? na_inv_lo(gi * g.wx, g.x, g.ks) : na_start(gi * g.wx, g.x, g.ks);
}
template <bool KSIDE>
__device__ __forceinline__ int na_group_hi(const NaGeom& g, int gi) {
    const int xl = min(gi * g.wx + g.wx, g.x) - 1;
    return KSIDE ? na_inv_hi(xl, g.x, g.ks) : na_start(xl, g.x, g.ks) + g.ks;
}

template <bool KSIDE>
__device__ __forceinline__ NaItem na_ring_item(const NaGeom& g, int it) {
    const int segs = na_ring_segments(g), per_map = g.ytiles * segs;
    NaItem t;
    const int map = it / per_map;
    t.map = map;
    const int rem = it - map * per_map;
    const int yt = rem / segs, sg = rem - yt * segs;
    t.y0 = yt * NA_TILE;
    const int yl = min(t.y0 + NA_TILE, g.y) - 1;
    t.c0 = KSIDE ? na_inv_lo(t.y0, g.y, g.ks) : na_start(t.y0, g.y, g.ks);
    const int chi = KSIDE ? na_inv_hi(yl, g.y, g.ks) : na_start(yl, g.y, g.ks) + g.ks;
    t.nch = (chi - t.c0 + NA_TILE - 1) / NA_TILE;
    t.g0 = sg * g.ring;
    t.g1 = min(t.g0 + g.ring, g.xtiles);
    return t;
}

// Stages rows [a, b) of `map` (columns c0 .. c0 + ncols) into ring slots r % g.rows through
// cp.async (a run that wraps past the last slot goes as two).
template <int D>
__device__ __forceinline__ void na_ring_stage(bf16_t* ring, const bf16_t* map, int a, int b, int c0, int ncols,
                                              const NaGeom& g) {
    if (a >= b) return;
    const int slot = a % g.rows, first = min(b - a, g.rows - slot);
    na_stage_mma<D>(ring + (i64)slot * g.ncw * (D + 8), map, a, first, c0, ncols, g.ncw, g.y, 1);
    if (first < b - a) na_stage_mma<D>(ring, map, a + first, b - a - first, c0, ncols, g.ncw, g.y, 1);
}

// Stages the statistics (lse * log2 e, delta) of rows [a, b) into ring slots r % g.rows (pitch
// ncw), as na_stage_stats does for a block tile.
__device__ __forceinline__ void na_ring_stats(float* ls, float* ds, const float* lse, const float* delta, int a, int b,
                                              int c0, int ncols, const NaGeom& g) {
    if (a >= b) return;
    const int slot = a % g.rows, first = min(b - a, g.rows - slot);
    na_stage_stats(ls + slot * g.ncw, ds + slot * g.ncw, lse, delta, a, first, c0, ncols, g.ncw, g.y);
    if (first < b - a) na_stage_stats(ls, ds, lse, delta, a + first, b - a - first, c0, ncols, g.ncw, g.y);
}

// The rows group gi stages: [a, hi) its own rows not yet staged, [max(a, hi), pre) the next
// group's rows that fit in the ring; moves `staged` (the first row not yet staged) past both.
struct NaRingRows {
    int a, hi, pre;
};

template <bool KSIDE>
__device__ __forceinline__ NaRingRows na_ring_rows(const NaGeom& g, const NaItem& t, int gi, int& staged) {
    const int lo = na_group_lo<KSIDE>(g, gi), hi = na_group_hi<KSIDE>(g, gi);
    const int next = gi + 1 < t.g1 ? na_group_hi<KSIDE>(g, gi + 1) : hi;
    NaRingRows rows;
    rows.a = max(staged, lo);
    rows.hi = hi;
    rows.pre = max(hi, min(next, lo + g.rows));
    staged = max(rows.a, rows.pre);
    return rows;
}

// The copies of a group for two ring-staged maps (K and V, or Q and dO): its own rows
// (committed), then the prefetch (committed). Call after the barrier that ends the previous
// group.
template <int D>
__device__ __forceinline__ void na_ring_copies(const NaGeom& g, const NaItem& t, const NaRingRows& rows, bf16_t* as,
                                               const bf16_t* amap, bf16_t* bs, const bf16_t* bmap, bool load) {
    const int ncols = t.nch * NA_TILE, b = max(rows.a, rows.hi);
    if (load) {
        na_ring_stage<D>(as, amap, rows.a, rows.hi, t.c0, ncols, g);
        na_ring_stage<D>(bs, bmap, rows.a, rows.hi, t.c0, ncols, g);
    }
    mma_cp_commit();
    if (load) {
        na_ring_stage<D>(as, amap, b, rows.pre, t.c0, ncols, g);
        na_ring_stage<D>(bs, bmap, b, rows.pre, t.c0, ncols, g);
    }
    mma_cp_commit();
}

// A warp's 16 queries in the mma forward and dq: map row x = x0 + warp, columns y0 + g and
// y0 + g + 8 (g = lane / 4, this lane's two fragment rows); their window starts (rows: `wlo`;
// columns: `sya`, `syb`) and token indices, clamped into the map for a row or column past it
// (which `active`, `oka` and `okb` say).
struct NaQueryTile {
    int x, wlo, sya, syb;
    bool active, oka, okb;
    i64 ta, tb;
};

__device__ __forceinline__ NaQueryTile na_query_tile(const NaGeom& g, i64 map, int x0, int y0) {
    const int warp = threadIdx.x >> 5, gr = (threadIdx.x & 31) >> 2;
    NaQueryTile w;
    w.x = x0 + warp;
    w.active = w.x < g.x;
    w.wlo = w.active ? na_start(w.x, g.x, g.ks) : 0;
    const int ya = y0 + gr, yb = ya + 8;
    w.oka = w.active && ya < g.y;
    w.okb = w.active && yb < g.y;
    w.sya = na_start(min(ya, g.y - 1), g.y, g.ks);
    w.syb = na_start(min(yb, g.y - 1), g.y, g.ks);
    const i64 trow = map * g.x * g.y + (i64)min(w.x, g.x - 1) * g.y;
    w.ta = trow + min(ya, g.y - 1);
    w.tb = trow + min(yb, g.y - 1);
    return w;
}

// One chunk of the forward for a warp: the scores of its 16 queries (A fragments `qf`) against
// the 16 staged keys at `kc`, masked to each query's window (`cb`: the key column of this lane's
// first score column; `sya`, `syb`: the window starts of its two rows), folded into the online
// softmax (`mr`, `lr`) and O (`o`) with the 16 staged values at `vc`.
template <int D>
__device__ __forceinline__ void na_fwd_chunk(float (&o)[D / 8][4], float (&mr)[2], float (&lr)[2],
                                             const unsigned (&qf)[D / 16][4], const bf16_t* kc, const bf16_t* vc,
                                             int cb, int sya, int syb, const NaGeom& g) {
    float s[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
    mma_abt<D>(s, qf, kc);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            int sy = e < 2 ? sya : syb;
            s[nt][e] = na_in_window(cb + nt * 8 + (e & 1), sy, g.ks) ? s[nt][e] * g.scale_log2 : NEG_INF;
        }
    // The running max lags (mma_lazy_rescale): after a row's first visible chunk O and the sum
    // are rarely rescaled, and most chunks skip the row maxima's shuffles, which sat between the
    // scores' mma and the exponentials.
    float cm[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr)
        cm[rr] = fmaxf(fmaxf(s[0][2 * rr], s[0][2 * rr + 1]), fmaxf(s[1][2 * rr], s[1][2 * rr + 1]));
    mma_lazy_rescale<D>(o, mr, lr, cm, NA_RESCALE_SLACK);
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        const float mu = mr[rr] == NEG_INF ? 0.0f : mr[rr];
        float ps = 0.0f;
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int e = 2 * rr; e < 2 * rr + 2; ++e) {
                s[nt][e] = mma_exp2(s[nt][e] - mu);
                ps += s[nt][e];
            }
        lr[rr] += ps;
    }
    unsigned pa[4];
    mma_to_a(pa, s);
    mma_av<D>(o, pa, vc);
}

// The forward with ring staging (see above); per group the same per-warp work as the tiles'.
template <int D>
__device__ void na2d_fwd_mma_ring(bf16_t* out, float* lse, const bf16_t* q, const bf16_t* k, const bf16_t* v,
                                  NaGeom g) {
    const int P = D + 8;
    bf16_t* ks = reinterpret_cast<bf16_t*>(na_smem);
    bf16_t* vs = ks + (i64)g.rows * g.ncw * P;
    const int tg = threadIdx.x & 3;
    i64 plane = (i64)g.x * g.y;
    const bool load = g.diag != NA_DIAG_NO_LOADS, compute = g.diag != NA_DIAG_LOADS_ONLY;
    if (!load) na_diag_zero(ks, (i64)g.rows * g.ncw * P);
    for (int it = blockIdx.x; it < na_ring_items(g); it += gridDim.x) {
        const NaItem t = na_ring_item<false>(g, it);
        const bf16_t* kmap = k + t.map * plane * D;
        const bf16_t* vmap = v + t.map * plane * D;
        int staged = 0;
        for (int gi = t.g0; gi < t.g1; ++gi) {
            const NaQueryTile w = na_query_tile(g, t.map, gi * g.wx, t.y0);
            const bool active = w.active, oka = w.oka, okb = w.okb;
            const int wlo = w.wlo, sya = w.sya, syb = w.syb;
            const i64 ta = w.ta, tb = w.tb;
            // The query fragments' loads are in flight across the barrier and the copies.
            unsigned qf[D / 16][4];
            mma_ldg_a<D>(qf, q + ta * D, q + tb * D, oka, okb);
            __syncthreads();
            na_ring_copies<D>(g, t, na_ring_rows<false>(g, t, gi, staged), ks, kmap, vs, vmap, load);
            mma_cp_wait<1>();
            __syncthreads();
            if (!active) continue;
            float o[D / 8][4];
#pragma unroll
            for (int nt = 0; nt < D / 8; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.0f;
            float mr[2] = {NEG_INF, NEG_INF}, lr[2] = {0.0f, 0.0f};
            if (compute) {
                int slot = wlo % g.rows;
                for (int r = wlo; r < wlo + g.ks; ++r) {
                    for (int ch = 0; ch < t.nch; ++ch) {
                        i64 off = ((i64)slot * g.ncw + ch * NA_TILE) * P;
                        na_fwd_chunk<D>(o, mr, lr, qf, ks + off, vs + off, t.c0 + ch * NA_TILE + 2 * tg, sya, syb, g);
                    }
                    slot = slot + 1 == g.rows ? 0 : slot + 1;
                }
            }
            float la = mma_quad_sum(lr[0]), lb = mma_quad_sum(lr[1]);
            mma_store_c<D>(out + ta * D, out + tb * D, oka, okb, o, 1.0f / la, 1.0f / lb);
            if (tg == 0) {
                if (oka) lse[ta] = (mr[0] + log2f(la)) * NA_LN2;
                if (okb) lse[tb] = (mr[1] + log2f(lb)) * NA_LN2;
            }
        }
    }
}

// Forward. Shared memory: K and V stages, bf16 [rows][ncw][D + 8] each.
template <int D>
__device__ void na2d_fwd_mma_impl(bf16_t* out, float* lse, const bf16_t* q, const bf16_t* k, const bf16_t* v,
                                  NaGeom g) {
    const int P = D + 8;
    bf16_t* ks = reinterpret_cast<bf16_t*>(na_smem);
    bf16_t* vs = ks + (i64)g.rows * g.ncw * P;
    const int tg = threadIdx.x & 3;
    i64 plane = (i64)g.x * g.y;
    const bool load = g.diag != NA_DIAG_NO_LOADS, compute = g.diag != NA_DIAG_LOADS_ONLY;
    if (!load) na_diag_zero(ks, (i64)g.rows * g.ncw * P);
    for (i64 it = blockIdx.x; it < na_tiles(g); it += gridDim.x) {
        NaTile tl = na_tile(g, it);
        int rlo = na_start(tl.x0, g.x, g.ks), rhi = na_start(tl.xl, g.x, g.ks) + g.ks;
        int c0 = na_start(tl.y0, g.y, g.ks);
        int nch = (na_start(tl.yl, g.y, g.ks) + g.ks - c0 + NA_TILE - 1) / NA_TILE;
        const bf16_t* kmap = k + tl.map * plane * D;
        const bf16_t* vmap = v + tl.map * plane * D;
        const NaQueryTile w = na_query_tile(g, tl.map, tl.x0, tl.y0);
        const bool active = w.active, oka = w.oka, okb = w.okb;
        const int wlo = w.wlo, whi = active ? wlo + g.ks : 0, sya = w.sya, syb = w.syb;
        const i64 ta = w.ta, tb = w.tb;
        unsigned qf[D / 16][4];
        mma_ldg_a<D>(qf, q + ta * D, q + tb * D, oka, okb);
        float o[D / 8][4];
#pragma unroll
        for (int nt = 0; nt < D / 8; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.0f;
        float mr[2] = {NEG_INF, NEG_INF}, lr[2] = {0.0f, 0.0f};
        for (int r0 = rlo; r0 < rhi; r0 += g.rows) {
            int nr = min(g.rows, rhi - r0);
            __syncthreads();
            if (load) {
                na_stage_mma<D>(ks, kmap, r0, nr, c0, nch * NA_TILE, g.ncw, g.y, g.async_stage);
                na_stage_mma<D>(vs, vmap, r0, nr, c0, nch * NA_TILE, g.ncw, g.y, g.async_stage);
                na_stage_land(g.async_stage);
            }
            __syncthreads();
            if (!active || !compute) continue;
            int ra = max(r0, wlo), rb = min(r0 + nr, whi);
            for (int r = ra; r < rb; ++r)
                for (int ch = 0; ch < nch; ++ch) {
                    i64 off = ((i64)(r - r0) * g.ncw + ch * NA_TILE) * P;
                    na_fwd_chunk<D>(o, mr, lr, qf, ks + off, vs + off, c0 + ch * NA_TILE + 2 * tg, sya, syb, g);
                }
        }
        if (active) {
            float la = mma_quad_sum(lr[0]), lb = mma_quad_sum(lr[1]);
            mma_store_c<D>(out + ta * D, out + tb * D, oka, okb, o, 1.0f / la, 1.0f / lb);
            if (tg == 0) {
                if (oka) lse[ta] = (mr[0] + log2f(la)) * NA_LN2;
                if (okb) lse[tb] = (mr[1] + log2f(lb)) * NA_LN2;
            }
        }
    }
}

// One chunk of dq for a warp: the probabilities of its 16 queries (`qf`; lse * log2 e `la`, `lb`)
// against the 16 staged keys at `kc`, recomputed and masked as in na_fwd_chunk, ds = p (dO . v -
// delta) with dO (`gf`) against the staged values at `vc`, and dq += ds K into `acc`.
template <int D>
__device__ __forceinline__ void na_dq_chunk(float (&acc)[D / 8][4], const unsigned (&qf)[D / 16][4],
                                            const unsigned (&gf)[D / 16][4], const bf16_t* kc, const bf16_t* vc,
                                            int cb, int sya, int syb, float la, float lb, float da, float db,
                                            const NaGeom& g) {
    float s[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
    float dp[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
    mma_abt<D>(s, qf, kc);
    mma_abt<D>(dp, gf, vc);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            bool lo = e < 2;
            bool in = na_in_window(cb + nt * 8 + (e & 1), lo ? sya : syb, g.ks);
            float x = s[nt][e] * g.scale_log2 - (lo ? la : lb);
            // exp2(-inf) = 0: selecting before the exponential spares the branch around it (6
            // instructions of the d64 loop), but at D < 64 (4 blocks, 128 registers) it costs a
            // spill.
            float p = D >= 64 ? mma_exp2(in ? x : NEG_INF) : (in ? mma_exp2(x) : 0.0f);
            s[nt][e] = p * (dp[nt][e] - (lo ? da : db));
        }
    unsigned dsa[4];
    mma_to_a(dsa, s);
    mma_av<D>(acc, dsa, kc);
}

// delta = dO . out of a warp's two rows (g, g + 8) from A fragments of out and dO at the same
// positions, reduced over the row's four lanes.
template <int D>
__device__ __forceinline__ void na_dq_delta(float& da, float& db, const unsigned (&of)[D / 16][4],
                                            const unsigned (&gf)[D / 16][4]) {
    da = 0.0f;
    db = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            unsigned a = of[kk][j], b = gf[kk][j];
            float pr = __uint_as_float(a << 16) * __uint_as_float(b << 16) +
                       __uint_as_float(a & 0xffff0000u) * __uint_as_float(b & 0xffff0000u);
            if (j & 1) db += pr;
            else da += pr;
        }
    da = mma_quad_sum(da);
    db = mma_quad_sum(db);
}

// dq with ring staging (see above); per group the same per-warp work as the tiles', in their
// order: the group's own q, dO, out and lse are loaded and delta computed before the barrier
// and the copies.
template <int D>
__device__ void na2d_dq_mma_ring(bf16_t* dq, float* delta, const bf16_t* q, const bf16_t* k, const bf16_t* v,
                                 const bf16_t* o, const bf16_t* go, const float* lse, NaGeom g) {
    const int P = D + 8;
    bf16_t* ks = reinterpret_cast<bf16_t*>(na_smem);
    bf16_t* vs = ks + (i64)g.rows * g.ncw * P;
    const int tg = threadIdx.x & 3;
    i64 plane = (i64)g.x * g.y;
    const bool load = g.diag != NA_DIAG_NO_LOADS, compute = g.diag != NA_DIAG_LOADS_ONLY;
    if (!load) na_diag_zero(ks, (i64)g.rows * g.ncw * P);
    for (int it = blockIdx.x; it < na_ring_items(g); it += gridDim.x) {
        const NaItem t = na_ring_item<false>(g, it);
        const bf16_t* kmap = k + t.map * plane * D;
        const bf16_t* vmap = v + t.map * plane * D;
        int staged = 0;
        for (int gi = t.g0; gi < t.g1; ++gi) {
            const NaQueryTile w = na_query_tile(g, t.map, gi * g.wx, t.y0);
            const bool active = w.active, oka = w.oka, okb = w.okb;
            const int wlo = w.wlo, sya = w.sya, syb = w.syb;
            const i64 ta = w.ta, tb = w.tb;
            unsigned qf[D / 16][4], gf[D / 16][4];
            float da, db;
            mma_ldg_a<D>(qf, q + ta * D, q + tb * D, oka, okb);
            mma_ldg_a<D>(gf, go + ta * D, go + tb * D, oka, okb);
            {
                unsigned of[D / 16][4];
                mma_ldg_a<D>(of, o + ta * D, o + tb * D, oka, okb);
                na_dq_delta<D>(da, db, of, gf);
            }
            float la = oka ? lse[ta] * NA_LOG2E : 0.0f, lb = okb ? lse[tb] * NA_LOG2E : 0.0f;
            __syncthreads();
            na_ring_copies<D>(g, t, na_ring_rows<false>(g, t, gi, staged), ks, kmap, vs, vmap, load);
            mma_cp_wait<1>();
            __syncthreads();
            if (!active) continue;
            float acc[D / 8][4];
#pragma unroll
            for (int nt = 0; nt < D / 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
            if (compute) {
                int slot = wlo % g.rows;
                for (int r = wlo; r < wlo + g.ks; ++r) {
                    for (int ch = 0; ch < t.nch; ++ch) {
                        i64 off = ((i64)slot * g.ncw + ch * NA_TILE) * P;
                        na_dq_chunk<D>(acc, qf, gf, ks + off, vs + off, t.c0 + ch * NA_TILE + 2 * tg, sya, syb, la, lb,
                                       da, db, g);
                    }
                    slot = slot + 1 == g.rows ? 0 : slot + 1;
                }
            }
            mma_store_c<D>(dq + ta * D, dq + tb * D, oka, okb, acc, g.scale, g.scale);
            if (tg == 0) {
                if (oka) delta[ta] = da;
                if (okb) delta[tb] = db;
            }
        }
    }
}

// dq and delta. Shared memory as the forward.
template <int D>
__device__ void na2d_dq_mma_impl(bf16_t* dq, float* delta, const bf16_t* q, const bf16_t* k, const bf16_t* v,
                                 const bf16_t* o, const bf16_t* go, const float* lse, NaGeom g) {
    const int P = D + 8;
    bf16_t* ks = reinterpret_cast<bf16_t*>(na_smem);
    bf16_t* vs = ks + (i64)g.rows * g.ncw * P;
    const int tg = threadIdx.x & 3;
    i64 plane = (i64)g.x * g.y;
    const bool load = g.diag != NA_DIAG_NO_LOADS, compute = g.diag != NA_DIAG_LOADS_ONLY;
    if (!load) na_diag_zero(ks, (i64)g.rows * g.ncw * P);
    for (i64 it = blockIdx.x; it < na_tiles(g); it += gridDim.x) {
        NaTile tl = na_tile(g, it);
        int rlo = na_start(tl.x0, g.x, g.ks), rhi = na_start(tl.xl, g.x, g.ks) + g.ks;
        int c0 = na_start(tl.y0, g.y, g.ks);
        int nch = (na_start(tl.yl, g.y, g.ks) + g.ks - c0 + NA_TILE - 1) / NA_TILE;
        const bf16_t* kmap = k + tl.map * plane * D;
        const bf16_t* vmap = v + tl.map * plane * D;
        const NaQueryTile w = na_query_tile(g, tl.map, tl.x0, tl.y0);
        const bool active = w.active, oka = w.oka, okb = w.okb;
        const int wlo = w.wlo, whi = active ? wlo + g.ks : 0, sya = w.sya, syb = w.syb;
        const i64 ta = w.ta, tb = w.tb;
        unsigned qf[D / 16][4], gf[D / 16][4];
        mma_ldg_a<D>(qf, q + ta * D, q + tb * D, oka, okb);
        mma_ldg_a<D>(gf, go + ta * D, go + tb * D, oka, okb);
        float da, db;
        {
            unsigned of[D / 16][4];
            mma_ldg_a<D>(of, o + ta * D, o + tb * D, oka, okb);
            na_dq_delta<D>(da, db, of, gf);
        }
        float la = oka ? lse[ta] * NA_LOG2E : 0.0f, lb = okb ? lse[tb] * NA_LOG2E : 0.0f;
        float acc[D / 8][4];
#pragma unroll
        for (int nt = 0; nt < D / 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
        for (int r0 = rlo; r0 < rhi; r0 += g.rows) {
            int nr = min(g.rows, rhi - r0);
            __syncthreads();
            if (load) {
                na_stage_mma<D>(ks, kmap, r0, nr, c0, nch * NA_TILE, g.ncw, g.y, g.async_stage);
                na_stage_mma<D>(vs, vmap, r0, nr, c0, nch * NA_TILE, g.ncw, g.y, g.async_stage);
                na_stage_land(g.async_stage);
            }
            __syncthreads();
            if (!active || !compute) continue;
            int ra = max(r0, wlo), rb = min(r0 + nr, whi);
            for (int r = ra; r < rb; ++r)
                for (int ch = 0; ch < nch; ++ch) {
                    i64 off = ((i64)(r - r0) * g.ncw + ch * NA_TILE) * P;
                    na_dq_chunk<D>(acc, qf, gf, ks + off, vs + off, c0 + ch * NA_TILE + 2 * tg, sya, syb, la, lb, da, db,
                                   g);
                }
        }
        if (active) {
            mma_store_c<D>(dq + ta * D, dq + tb * D, oka, okb, acc, g.scale, g.scale);
            if (tg == 0) {
                if (oka) delta[ta] = da;
                if (okb) delta[tb] = db;
            }
        }
    }
}

// One chunk of dk/dv for a warp: its 16 keys (A operands `mk`, values `mv`, staged) against the
// 16 staged queries at `qc` (their dO at `gc`, lse * log2 e at `lc`, delta at `dc`): transposed
// scores (rows the keys, columns the queries), p recomputed from the lse and masked to the
// queries whose window holds each key (`qrel_a`, `qrel_b`: this lane's first query column
// relative to the first such query of its two keys; `qn_a`, `qn_b`: how many there are),
// ds = p (dp - delta), then dv += p dO and dk += ds q.
template <int D>
__device__ __forceinline__ void na_dkdv_chunk(float (&ak)[D / 8][4], float (&av)[D / 8][4], const bf16_t* mk,
                                              const bf16_t* mv, const bf16_t* qc, const bf16_t* gc, const float* lc,
                                              const float* dc, int qrel_a, int qrel_b, unsigned qn_a, unsigned qn_b,
                                              float scale_log2) {
    const int tg = threadIdx.x & 3;
    float s[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
    float dp[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
    mma_abt_s<D>(s, mk, qc);
    mma_abt_s<D>(dp, mv, gc);
    float ds[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int ce = 0; ce < 2; ++ce) {
            int cl = nt * 8 + 2 * tg + ce;  // the query column within the chunk
            float l2 = lc[cl], dl = dc[cl];
#pragma unroll
            for (int rr = 0; rr < 2; ++rr) {
                int e = 2 * rr + ce;
                bool valid = rr ? (unsigned)(qrel_b + nt * 8 + ce) < qn_b : (unsigned)(qrel_a + nt * 8 + ce) < qn_a;
                // exp2(-inf) = 0: a select, not a branch around the exponential.
                float p = mma_exp2(valid ? s[nt][e] * scale_log2 - l2 : NEG_INF);
                ds[nt][e] = p * (dp[nt][e] - dl);
                s[nt][e] = p;
            }
        }
    unsigned pa[4], dsa[4];
    mma_to_a(pa, s);
    mma_to_a(dsa, ds);
    mma_av<D>(av, pa, gc);
    mma_av<D>(ak, dsa, qc);
}

// dk and dv. Shared memory: the block's own K and V tiles bf16 [wx * 16][D + 8] each, then the Q
// and dO stages bf16 [rows][ncw][D + 8] each, then lse * log2(e) and delta f32 [rows][ncw] each.
template <int D>
__device__ void na2d_dkdv_mma_impl(bf16_t* dk, bf16_t* dv, const bf16_t* q, const bf16_t* k, const bf16_t* v,
                                   const bf16_t* go, const float* lse, const float* delta, NaGeom g) {
    const int P = D + 8;
    bf16_t* kt = reinterpret_cast<bf16_t*>(na_smem);
    bf16_t* vt = kt + g.wx * NA_TILE * P;
    bf16_t* qs = vt + g.wx * NA_TILE * P;
    bf16_t* gs = qs + (i64)g.rows * g.ncw * P;
    float* ls = reinterpret_cast<float*>(gs + (i64)g.rows * g.ncw * P);
    float* dls = ls + g.rows * g.ncw;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int gr = lane >> 2, tg = lane & 3;
    i64 plane = (i64)g.x * g.y;
    const bool load = g.diag != NA_DIAG_NO_LOADS, compute = g.diag != NA_DIAG_LOADS_ONLY;
    if (!load) na_diag_zero(kt, ((i64)2 * g.wx * NA_TILE * P + (i64)2 * g.rows * g.ncw * P) / 2 + (i64)2 * g.rows * g.ncw);
    for (i64 it = blockIdx.x; it < na_tiles(g); it += gridDim.x) {
        NaTile tl = na_tile(g, it);
        int rlo = na_inv_lo(tl.x0, g.x, g.ks), rhi = na_inv_hi(tl.xl, g.x, g.ks);
        int c0 = na_inv_lo(tl.y0, g.y, g.ks);
        int nch = (na_inv_hi(tl.yl, g.y, g.ks) - c0 + NA_TILE - 1) / NA_TILE;
        i64 mbase = tl.map * plane;
        int x = tl.x0 + warp;
        bool active = x < g.x;
        int ilo = active ? na_inv_lo(x, g.x, g.ks) : 0, ihi = active ? na_inv_hi(x, g.x, g.ks) : 0;
        int ja = tl.y0 + gr, jb = ja + 8;
        bool oka = active && ja < g.y, okb = active && jb < g.y;
        i64 trow = mbase + (i64)min(x, g.x - 1) * g.y;
        i64 ta = trow + min(ja, g.y - 1), tb = trow + min(jb, g.y - 1);
        // The query columns whose window holds key column ja (jb) are the contiguous range
        // qlo .. qlo + qn (all below Y), so a chunk element's mask is one unsigned compare of its
        // column's offset from qlo; qn = 0 masks a key past Y. (Recomputing each column's window
        // start, as the simt kernel does, took about a third of this loop's instructions.)
        const int qlo_a = na_inv_lo(ja, g.y, g.ks), qlo_b = na_inv_lo(jb, g.y, g.ks);
        const unsigned qn_a = oka ? (unsigned)(na_inv_hi(ja, g.y, g.ks) - qlo_a) : 0u;
        const unsigned qn_b = okb ? (unsigned)(na_inv_hi(jb, g.y, g.ks) - qlo_b) : 0u;
        const float scale_log2 = g.scale_log2;
        __syncthreads();  // the previous tile's warps may still read kt / vt
        // Landed with the first stage below.
        if (load) {
            na_stage_mma<D>(kt, k + mbase * D, tl.x0, tl.xl - tl.x0 + 1, tl.y0, NA_TILE, NA_TILE, g.y, g.async_stage);
            na_stage_mma<D>(vt, v + mbase * D, tl.x0, tl.xl - tl.x0 + 1, tl.y0, NA_TILE, NA_TILE, g.y, g.async_stage);
        }
        const bf16_t* mk = kt + warp * NA_TILE * P;
        const bf16_t* mv = vt + warp * NA_TILE * P;
        float ak[D / 8][4], av[D / 8][4];
#pragma unroll
        for (int nt = 0; nt < D / 8; ++nt) {
            ak[nt][0] = ak[nt][1] = ak[nt][2] = ak[nt][3] = 0.0f;
            av[nt][0] = av[nt][1] = av[nt][2] = av[nt][3] = 0.0f;
        }
        for (int r0 = rlo; r0 < rhi; r0 += g.rows) {
            int nr = min(g.rows, rhi - r0);
            __syncthreads();
            if (load) {
                na_stage_mma<D>(qs, q + mbase * D, r0, nr, c0, nch * NA_TILE, g.ncw, g.y, g.async_stage);
                na_stage_mma<D>(gs, go + mbase * D, r0, nr, c0, nch * NA_TILE, g.ncw, g.y, g.async_stage);
                // The statistics' plain loads overlap the copies in flight.
                na_stage_stats(ls, dls, lse + mbase, delta + mbase, r0, nr, c0, nch * NA_TILE, g.ncw, g.y);
                na_stage_land(g.async_stage);
            }
            __syncthreads();
            if (!active || !compute) continue;
            int ra = max(r0, ilo), rb = min(r0 + nr, ihi);
            for (int r = ra; r < rb; ++r)
                for (int ch = 0; ch < nch; ++ch) {
                    int tok = (r - r0) * g.ncw + ch * NA_TILE;
                    // Offsets of this lane's first query column from qlo_a and qlo_b.
                    const int qrel = c0 + ch * NA_TILE + 2 * tg;
                    na_dkdv_chunk<D>(ak, av, mk, mv, qs + (i64)tok * P, gs + (i64)tok * P, ls + tok, dls + tok,
                                     qrel - qlo_a, qrel - qlo_b, qn_a, qn_b, scale_log2);
                }
        }
        if (active) {
            mma_store_c<D>(dk + ta * D, dk + tb * D, oka, okb, ak, g.scale, g.scale);
            mma_store_c<D>(dv + ta * D, dv + tb * D, oka, okb, av, 1.0f, 1.0f);
        }
    }
}

// dk and dv with ring staging (see above): the ring holds Q and dO bf16 [rows][ncw][D + 8] each
// and lse * log2(e) and delta f32 [rows][ncw] each, after the group's own K and V tiles as in
// the tile kernel (staged with the group's rows, so their copies do not overlap the previous
// group's work). The statistics go through plain loads and stores into the same slots, the
// prefetched rows' too (their slots are free once the barrier has passed).
template <int D>
__device__ void na2d_dkdv_mma_ring(bf16_t* dk, bf16_t* dv, const bf16_t* q, const bf16_t* k, const bf16_t* v,
                                   const bf16_t* go, const float* lse, const float* delta, NaGeom g) {
    const int P = D + 8;
    bf16_t* kt = reinterpret_cast<bf16_t*>(na_smem);
    bf16_t* vt = kt + g.wx * NA_TILE * P;
    bf16_t* qs = vt + g.wx * NA_TILE * P;
    bf16_t* gs = qs + (i64)g.rows * g.ncw * P;
    float* ls = reinterpret_cast<float*>(gs + (i64)g.rows * g.ncw * P);
    float* dls = ls + g.rows * g.ncw;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int gr = lane >> 2, tg = lane & 3;
    i64 plane = (i64)g.x * g.y;
    const bool load = g.diag != NA_DIAG_NO_LOADS, compute = g.diag != NA_DIAG_LOADS_ONLY;
    if (!load) na_diag_zero(kt, ((i64)2 * g.wx * NA_TILE * P + (i64)2 * g.rows * g.ncw * P) / 2 + (i64)2 * g.rows * g.ncw);
    for (int it = blockIdx.x; it < na_ring_items(g); it += gridDim.x) {
        const NaItem t = na_ring_item<true>(g, it);
        const i64 mbase = t.map * plane;
        int staged = 0;
        for (int gi = t.g0; gi < t.g1; ++gi) {
            const int x0 = gi * g.wx, xl = min(x0 + g.wx, g.x) - 1;
            int x = x0 + warp;
            bool active = x < g.x;
            int ilo = active ? na_inv_lo(x, g.x, g.ks) : 0, ihi = active ? na_inv_hi(x, g.x, g.ks) : 0;
            int ja = t.y0 + gr, jb = ja + 8;
            bool oka = active && ja < g.y, okb = active && jb < g.y;
            // The queries whose window holds key column ja (jb): qlo .. qlo + qn (see the tile
            // kernel).
            const int qlo_a = na_inv_lo(ja, g.y, g.ks), qlo_b = na_inv_lo(jb, g.y, g.ks);
            const unsigned qn_a = oka ? (unsigned)(na_inv_hi(ja, g.y, g.ks) - qlo_a) : 0u;
            const unsigned qn_b = okb ? (unsigned)(na_inv_hi(jb, g.y, g.ks) - qlo_b) : 0u;
            __syncthreads();
            const NaRingRows rows = na_ring_rows<true>(g, t, gi, staged);
            if (load) {
                na_stage_mma<D>(kt, k + mbase * D, x0, xl - x0 + 1, t.y0, NA_TILE, NA_TILE, g.y, 1);
                na_stage_mma<D>(vt, v + mbase * D, x0, xl - x0 + 1, t.y0, NA_TILE, NA_TILE, g.y, 1);
            }
            na_ring_copies<D>(g, t, rows, qs, q + mbase * D, gs, go + mbase * D, load);
            if (load) na_ring_stats(ls, dls, lse + mbase, delta + mbase, rows.a, rows.pre, t.c0, t.nch * NA_TILE, g);
            mma_cp_wait<1>();
            __syncthreads();
            if (!active) continue;
            const bf16_t* mk = kt + warp * NA_TILE * P;
            const bf16_t* mv = vt + warp * NA_TILE * P;
            float ak[D / 8][4], av[D / 8][4];
#pragma unroll
            for (int nt = 0; nt < D / 8; ++nt) {
                ak[nt][0] = ak[nt][1] = ak[nt][2] = ak[nt][3] = 0.0f;
                av[nt][0] = av[nt][1] = av[nt][2] = av[nt][3] = 0.0f;
            }
            if (compute) {
                int slot = ilo % g.rows;
                for (int r = ilo; r < ihi; ++r) {
                    for (int ch = 0; ch < t.nch; ++ch) {
                        const int tok = slot * g.ncw + ch * NA_TILE, qrel = t.c0 + ch * NA_TILE + 2 * tg;
                        na_dkdv_chunk<D>(ak, av, mk, mv, qs + (i64)tok * P, gs + (i64)tok * P, ls + tok, dls + tok,
                                         qrel - qlo_a, qrel - qlo_b, qn_a, qn_b, g.scale_log2);
                    }
                    slot = slot + 1 == g.rows ? 0 : slot + 1;
                }
            }
            // The token offsets only now: held across the chunk loop they cost a spill at D 64.
            const i64 trow = mbase + (i64)x * g.y;
            const i64 ta = trow + min(ja, g.y - 1), tb = trow + min(jb, g.y - 1);
            mma_store_c<D>(dk + ta * D, dk + tb * D, oka, okb, ak, g.scale, g.scale);
            mma_store_c<D>(dv + ta * D, dv + tb * D, oka, okb, av, 1.0f, 1.0f);
        }
    }
}

// ------------------------------------------------------------------------------------------------
// instantiations

#define NA_NAIVE_KERNELS(T, S)                                                                            \
    extern "C" __global__ void na2d_fwd_naive_##S(T* out, float* lse, const T* q, const T* k, const T* v, \
                                                 NaGeom g) {                                              \
        na2d_fwd_naive_impl<T>(out, lse, q, k, v, g);                                                     \
    }                                                                                                     \
    extern "C" __global__ void na2d_dq_naive_##S(T* dq, float* delta, const T* q, const T* k, const T* v, \
                                                const T* o, const T* go, const float* lse, NaGeom g) {    \
        na2d_dq_naive_impl<T>(dq, delta, q, k, v, o, go, lse, g);                                         \
    }                                                                                                     \
    extern "C" __global__ void na2d_dkdv_naive_##S(T* dk, T* dv, const T* q, const T* k, const T* v,      \
                                                  const T* go, const float* lse, const float* delta,      \
                                                  NaGeom g) {                                             \
        na2d_dkdv_naive_impl<T>(dk, dv, q, k, v, go, lse, delta, g);                                      \
    }

#define NA_SIMT_KERNELS(T, S, D)                                                                             \
    extern "C" __global__ void __launch_bounds__(NA_THREADS, 1)                                                 \
        na2d_fwd_simt_##S##_d##D(T* out, float* lse, const T* q, const T* k, const T* v, NaGeom g) {         \
        na2d_fwd_simt_impl<T, D>(out, lse, q, k, v, g);                                                      \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(NA_THREADS, 1)                                                 \
        na2d_dq_simt_##S##_d##D(T* dq, float* delta, const T* q, const T* k, const T* v, const T* o,         \
                                const T* go, const float* lse, NaGeom g) {                                   \
        na2d_dq_simt_impl<T, D>(dq, delta, q, k, v, o, go, lse, g);                                          \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(NA_THREADS, 1)                                                 \
        na2d_dkdv_simt_##S##_d##D(T* dk, T* dv, const T* q, const T* k, const T* v, const T* go,             \
                                  const float* lse, const float* delta, NaGeom g) {                          \
        na2d_dkdv_simt_impl<T, D>(dk, dv, q, k, v, go, lse, delta, g);                                       \
    }

#define NA_MMA_KERNELS(D)                                                                                    \
    extern "C" __global__ void __launch_bounds__(NA_THREADS, NA_MMA_FWD_BLOCKS(D))                               \
        na2d_fwd_mma_bf16_d##D(bf16_t* out, float* lse, const bf16_t* q, const bf16_t* k, const bf16_t* v,   \
                               NaGeom g) {                                                                   \
        na2d_fwd_mma_impl<D>(out, lse, q, k, v, g);                                                          \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(NA_THREADS, NA_MMA_DQ_BLOCKS(D))                                \
        na2d_dq_mma_bf16_d##D(bf16_t* dq, float* delta, const bf16_t* q, const bf16_t* k, const bf16_t* v,   \
                              const bf16_t* o, const bf16_t* go, const float* lse, NaGeom g) {               \
        na2d_dq_mma_impl<D>(dq, delta, q, k, v, o, go, lse, g);                                              \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(NA_THREADS, NA_MMA_DKDV_BLOCKS(D))                              \
        na2d_dkdv_mma_bf16_d##D(bf16_t* dk, bf16_t* dv, const bf16_t* q, const bf16_t* k, const bf16_t* v,   \
                                const bf16_t* go, const float* lse, const float* delta, NaGeom g) {          \
        na2d_dkdv_mma_impl<D>(dk, dv, q, k, v, go, lse, delta, g);                                           \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(NA_THREADS, NA_MMA_FWD_BLOCKS(D))                               \
        na2d_fwd_ring_mma_bf16_d##D(bf16_t* out, float* lse, const bf16_t* q, const bf16_t* k,               \
                                    const bf16_t* v, NaGeom g) {                                             \
        na2d_fwd_mma_ring<D>(out, lse, q, k, v, g);                                                          \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(NA_THREADS, NA_MMA_DQ_BLOCKS(D))                                \
        na2d_dq_ring_mma_bf16_d##D(bf16_t* dq, float* delta, const bf16_t* q, const bf16_t* k,               \
                                   const bf16_t* v, const bf16_t* o, const bf16_t* go, const float* lse,     \
                                   NaGeom g) {                                                               \
        na2d_dq_mma_ring<D>(dq, delta, q, k, v, o, go, lse, g);                                              \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(NA_THREADS, NA_MMA_DKDV_BLOCKS(D))                              \
        na2d_dkdv_ring_mma_bf16_d##D(bf16_t* dk, bf16_t* dv, const bf16_t* q, const bf16_t* k,               \
                                     const bf16_t* v, const bf16_t* go, const float* lse, const float* delta,\
                                     NaGeom g) {                                                             \
        na2d_dkdv_mma_ring<D>(dk, dv, q, k, v, go, lse, delta, g);                                           \
    }

NA_NAIVE_KERNELS(float, f32)
NA_NAIVE_KERNELS(bf16_t, bf16)

NA_SIMT_KERNELS(float, f32, 16)
NA_SIMT_KERNELS(float, f32, 32)
NA_SIMT_KERNELS(float, f32, 48)
NA_SIMT_KERNELS(float, f32, 64)
NA_SIMT_KERNELS(bf16_t, bf16, 16)
NA_SIMT_KERNELS(bf16_t, bf16, 32)
NA_SIMT_KERNELS(bf16_t, bf16, 48)
NA_SIMT_KERNELS(bf16_t, bf16, 64)

NA_MMA_KERNELS(16)
NA_MMA_KERNELS(32)
NA_MMA_KERNELS(48)
NA_MMA_KERNELS(64)
NA_MMA_KERNELS(80)
NA_MMA_KERNELS(96)
NA_MMA_KERNELS(112)
NA_MMA_KERNELS(128)
