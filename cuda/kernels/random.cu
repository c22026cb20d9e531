// random.cu: Philox4x32-10 keep masks for dropout and drop-path, and the masked scaling that
// applies such a mask (the forward and the backward of both ops).
//
// Philox4x32-10 is transcribed from mvar_engine::rng (the CPU's one generator) so that a mask
// drawn here equals the mask the CPU draws from the same generator state: key = the 64-bit seed
// as (low word, high word); block b has the counter (b low word, b high word, 0, 0) and gives four
// u32 words. A draw of n values that starts at block `first` reads, for value i, word i % 4 of
// block first + i / 4 (the host advances the generator past ceil(n / 4) blocks). The CPU keeps
// value i iff u_i < keep with u_i = ((w_i >> 8) + 0.5) / 2^24 compared in f64; u_i is increasing
// in w_i >> 8, so that is (w_i >> 8) < threshold for the integer threshold the host derives with
// the very same f64 expression (`keep_threshold`), and no floating point is needed here.
//
// Layout: the mask is u8 (1 = keep), one byte per decision; x and out are dense buffers in which
// element i uses decision i / group (group = 1 for dropout, the per-sample element count for
// drop-path).
// Parallel decomposition: keep_mask runs one thread per Philox block (it writes up to four mask
// bytes, the last block may be partial); mask_scale runs one thread per element, or, where a
// group is a whole number of 16-byte vectors at aligned addresses (drop-path's samples),
// mask_scale_vec one thread per vector. Grid-stride loops, 256 threads a block, no shared
// memory, no atomics.
// Numerics: out = x * scale in f32 (bf16 widened on load, rounded once on store); dropped
// elements are exactly 0, whatever x holds (the CPU's choice too, so NaNs do not leak through).

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

// One Philox4x32-10 block: ten rounds, the key bumped before every round but the first.
__device__ __forceinline__ uint4 philox4x32_10(uint4 c, unsigned int k0, unsigned int k1) {
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += PHILOX_W0;
            k1 += PHILOX_W1;
        }
        unsigned int hi0 = __umulhi(PHILOX_M0, c.x), lo0 = PHILOX_M0 * c.x;
        unsigned int hi1 = __umulhi(PHILOX_M1, c.z), lo1 = PHILOX_M1 * c.z;
        c = make_uint4(hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0);
    }
    return c;
}

// mask[i] = ((word i of the draw starting at block first) >> 8) < threshold, i < n.
extern "C" __global__ void keep_mask(u8* mask, i64 n, unsigned long long seed,
                                     unsigned long long first, unsigned int threshold) {
    i64 blocks = (n + 3) / 4;
    unsigned int k0 = (unsigned int)seed, k1 = (unsigned int)(seed >> 32);
    GRID_STRIDE(b, blocks) {
        unsigned long long index = first + (unsigned long long)b;
        uint4 r = philox4x32_10(make_uint4((unsigned int)index, (unsigned int)(index >> 32), 0u, 0u), k0, k1);
        unsigned int w[4] = {r.x, r.y, r.z, r.w};
        i64 base = b * 4;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            if (base + q < n) mask[base + q] = (w[q] >> 8) < threshold ? 1 : 0;
        }
    }
}

// The decision of element e: e / group, in 32 bits where both fit (the GPU divides 64-bit
// integers in software).
__device__ __forceinline__ i64 mask_decision(i64 e, i64 group) {
    if (e <= 0xffffffffLL && group <= 0xffffffffLL) return (i64)((unsigned int)e / (unsigned int)group);
    return e / group;
}

template <typename T>
__device__ void mask_scale_impl(T* out, const T* x, const u8* mask, i64 n, i64 group, float scale) {
    GRID_STRIDE(i, n) {
        float r = mask[mask_decision(i, group)] ? Io<T>::load(x, i) * scale : 0.0f;
        Io<T>::store(out, i, r);
    }
}

// The tuned variant for groups of whole 16-byte vectors (drop-path: a decision per sample): one
// thread per vector, which shares one decision. i counts vectors of N elements.
template <typename T>
__device__ void mask_scale_vec_impl(T* out, const T* x, const u8* mask, i64 nvec, i64 group, float scale) {
    constexpr int N = Vec16<T>::N;
    GRID_STRIDE(i, nvec) {
        float v[N];
        const bool keep = mask[mask_decision(i * N, group)] != 0;
        if (keep) {
            Vec16<T>::load(x + i * N, v);
#pragma unroll
            for (int k = 0; k < N; ++k) v[k] *= scale;
        } else {
#pragma unroll
            for (int k = 0; k < N; ++k) v[k] = 0.0f;
        }
        Vec16<T>::store(out + i * N, v);
    }
}

#define MASK_KERNELS(T, S)                                                                           \
    extern "C" __global__ void mask_scale_##S(T* out, const T* x, const u8* mask, i64 n, i64 group, \
                                             float scale) {                                         \
        mask_scale_impl<T>(out, x, mask, n, group, scale);                                          \
    }                                                                                               \
    extern "C" __global__ void mask_scale_vec_##S(T* out, const T* x, const u8* mask, i64 nvec,     \
                                                 i64 group, float scale) {                          \
        mask_scale_vec_impl<T>(out, x, mask, nvec, group, scale);                                   \
    }

MASK_KERNELS(float, f32)
MASK_KERNELS(bf16_t, bf16)
