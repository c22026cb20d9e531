// common.cuh: put in front of every kernel file by the loader (see cuda/src/kernels.rs).
//
// What every kernel shares:
// - bf16 is handled as its raw 16 bits (`bf16_t`), widened to f32 on load and rounded to
//   nearest-even on store, so no CUDA header is needed and the bits match the `half` crate on the
//   host. All arithmetic is f32 ("bf16 storage, f32 accumulation").
// - `Io<T>` loads/stores any element type as float; kernels are templates over the storage type
//   and are instantiated with extern "C" names `<name>_<suffix>` (suffix f32, bf16, i64, u8).
// - Grid-stride loops over 64-bit element counts: the host launches at most 65536 blocks and
//   every thread walks the remainder, so any size works with one launch configuration.
// - Broadcasting: a `Layout` describes up to MAX_RANK output axes and, per input, the stride of
//   each output axis in that input (0 on broadcast axes); `offset_of` turns an output index into
//   an input offset.

typedef unsigned short bf16_t;
typedef long long i64;
typedef unsigned char u8;
// A 16-byte word: what the raw-bit copies (band copies, strided copies) move when a run of
// elements is a whole number of them (the host picks the word; see copy_word in
// cuda/src/ops/mod.rs).
struct __align__(16) Word16 {
    unsigned int a, b, c, d;
};

#define MAX_RANK 8
// NVRTC compiles without the C headers, so no INFINITY macro.
#define NEG_INF __int_as_float(0xff800000)
#define POS_INF __int_as_float(0x7f800000)

__device__ __forceinline__ float bf16_to_f32(bf16_t h) {
    return __uint_as_float(((unsigned int)h) << 16);
}

__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (bf16_t)((u >> 16) | 0x40u);  // NaN stays a (quiet) NaN
    }
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
    return (bf16_t)(u >> 16);
}

template <typename T> struct Io;
template <> struct Io<float> {
    static __device__ __forceinline__ float load(const float* p, i64 i) { return p[i]; }
    static __device__ __forceinline__ void store(float* p, i64 i, float v) { p[i] = v; }
};
template <> struct Io<bf16_t> {
    static __device__ __forceinline__ float load(const bf16_t* p, i64 i) { return bf16_to_f32(p[i]); }
    static __device__ __forceinline__ void store(bf16_t* p, i64 i, float v) { p[i] = f32_to_bf16(v); }
};
template <> struct Io<i64> {
    static __device__ __forceinline__ float load(const i64* p, i64 i) { return (float)p[i]; }
    // Rust's `as` semantics: NaN -> 0, out of range saturates (the CPU reference uses `as`).
    static __device__ __forceinline__ void store(i64* p, i64 i, float v) {
        p[i] = (v != v) ? 0 : (v >= 9.2233720e18f ? 9223372036854775807LL : (v <= -9.2233720e18f ? (-9223372036854775807LL - 1) : (i64)v));
    }
};
template <> struct Io<u8> {
    static __device__ __forceinline__ float load(const u8* p, i64 i) { return (float)p[i]; }
    static __device__ __forceinline__ void store(u8* p, i64 i, float v) { p[i] = (u8)fminf(fmaxf(v, 0.0f), 255.0f); }
};

// 16 bytes as floats, for kernels that move 16 bytes per access (rows or whole buffers whose
// length is a multiple of N and whose addresses are 16-byte aligned, checked by the host):
// 4 f32, or 8 bf16 (element 2k in the low half of word k), rounded on store as Io does.
template <typename T> struct Vec16;
template <> struct Vec16<float> {
    static constexpr int N = 4;
    static __device__ __forceinline__ void load(const float* p, float* v) {
        const float4 q = *reinterpret_cast<const float4*>(p);
        v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
    }
    static __device__ __forceinline__ void store(float* p, const float* v) {
        *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
    }
};
template <> struct Vec16<bf16_t> {
    static constexpr int N = 8;
    static __device__ __forceinline__ void load(const bf16_t* p, float* v) {
        const uint4 q = *reinterpret_cast<const uint4*>(p);
        const unsigned int w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            v[2 * k] = __uint_as_float(w[k] << 16);
            v[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
        }
    }
    static __device__ __forceinline__ void store(bf16_t* p, const float* v) {
        unsigned int w[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            w[k] = (unsigned int)f32_to_bf16(v[2 * k]) | ((unsigned int)f32_to_bf16(v[2 * k + 1]) << 16);
        }
        *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
    }
};

#define GRID_STRIDE(i, n) \
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)blockDim.x * gridDim.x)

// Output shape and, for up to three inputs, the stride of each output axis in that input.
// Mirrors `mvar_cuda::ops::Layout` (repr(C)).
// Layout.flags
#define LAYOUT_CONTIGUOUS 1  // every input has the output's shape: offsets are the index itself
#define LAYOUT_INDEX32 2     // the output has fewer than 2^32 elements: 32-bit index arithmetic
struct Layout {
    int rank;
    int flags;
    i64 dims[MAX_RANK];
    i64 strides[3][MAX_RANK];
};

__device__ __forceinline__ i64 offset_of(const Layout& l, int input, i64 i) {
    if (l.flags & LAYOUT_CONTIGUOUS) return i;
    i64 off = 0;
    if (l.flags & LAYOUT_INDEX32) {
        // The GPU divides 64-bit integers in software, several times slower than 32-bit ones;
        // with every index and extent below 2^32 the per-axis divisions run in 32 bits.
        unsigned int u = (unsigned int)i;
        for (int ax = l.rank - 1; ax >= 0; --ax) {
            const unsigned int d = (unsigned int)l.dims[ax];
            const unsigned int q = u / d;
            off += (i64)(u - q * d) * l.strides[input][ax];
            u = q;
        }
        return off;
    }
    for (int ax = l.rank - 1; ax >= 0; --ax) {
        const i64 d = l.dims[ax];
        const i64 q = i / d;
        off += (i - q * d) * l.strides[input][ax];
        i = q;
    }
    return off;
}

// Warp- and block-wide sums of one value per thread: float, or double where small terms must
// not be lost (gradient norms, sampling masses). The block form needs blockDim.x a multiple of
// 32, at most 1024; every thread gets the total. `scratch` holds 32 values of shared memory.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    v = (threadIdx.x < warps) ? scratch[threadIdx.x] : T(0);
    if (warp == 0) v = warp_sum(v);
    if (threadIdx.x == 0) scratch[0] = v;
    __syncthreads();
    return scratch[0];
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    v = (threadIdx.x < warps) ? scratch[threadIdx.x] : NEG_INF;
    if (warp == 0) v = warp_max(v);
    if (threadIdx.x == 0) scratch[0] = v;
    __syncthreads();
    return scratch[0];
}
