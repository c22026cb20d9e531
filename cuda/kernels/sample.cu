// sample.cu: one token per row of logits with top-k and top-p (nucleus) filtering, the official
// `sample_with_top_k_top_p_` with the uniform draw given, so a sampler's logits need not leave
// the GPU (only the tokens do).
//
// What it computes, per row x[0..V) with its uniform u (the CPU reference, ops/src/sample.rs,
// defines the same in f64 and the parity test holds the two together):
//   1. top-k: keep x[i] >= the k-th largest value (ties at it all kept); k = 0 or k >= V keeps all.
//   2. top-p: order the kept logits ascending, ties by index; with p_i = exp(x_i - m) / Z over the
//      kept (m the row maximum), drop the prefix of that order whose inclusive running sum of p
//      is <= 1 - top_p, never the last (the largest) one. top_p = 0 skips this.
//   3. draw: w_i = exp(x_i - m) over what is left; the token is the smallest index i whose
//      running sum of w (index order) exceeds u * sum(w); if rounding leaves none, the largest
//      kept index.
//   A row with a NaN or infinite logit gets -1 - (its first such index) instead: the host turns
//   that into an error naming the row and the code (torch.multinomial refuses such rows too).
//
// Layout: logits [rows, V] row-major (f32 or bf16, widened exactly to double); `uniform` holds
// rows doubles (the host's draws, passed as their bits); tokens i64 [rows].
//
// Parallel decomposition: one block of SAMPLE_THREADS threads per row (grid-stride over rows).
// Every step is a pass over the row followed by a block-wide reduction that every thread
// receives. Where the row comes from in a pass is the row source's business (MemoryRow,
// HeldRow below): re-read from global memory, or, when the host asks for it and the row fits
// (V <= 16 x 256), held from one read (logits in registers, weights and masses in shared
// memory, computed once).
// The steps:
// - the k-th largest value by radix select on order-preserving 32-bit keys of the values
//   (4 passes of 8 bits, an integer histogram in shared memory: exact and deterministic);
// - the top-p boundary by binary search over 64-bit keys (value key, index) for the largest key
//   whose mass (sum of p over kept logits with key <= it) is <= 1 - top_p (~64 passes);
// - the draw by binary search over the index for the first running sum above u * sum(w)
//   (log2 V passes).
// Sums are in double with a fixed reduction order, so the result is deterministic and differs
// from the CPU's sequential f64 sums only by rounding: a token can differ only where a running
// sum lies within ~1e-15 of its threshold.
//
// The naive variant (sample_rows_naive_*) runs the same algorithm on one thread per row; it is
// the reference the tuned kernel is benchmarked against.
//
// filter_rows_* runs steps 1-2 only (the same block-per-row code, `filter_row`) and writes the
// row back with every logit step 3 could not draw set to -inf and the others copied bit for bit:
// the official sampler's in-place filtering, which its `more_smooth` Gumbel softmax reads.
// Layout: logits and out [rows, V] of one float type; status i64 [rows], 0 or -1 - (the first
// non-finite logit's index) as the tokens above (that row of out is then not written).

#define SAMPLE_THREADS 256

// Order-preserving key of a finite float: larger value, larger key; -0 and +0 equal (as the
// CPU's comparisons treat them).
__device__ __forceinline__ unsigned int order_key(float x) {
    unsigned int b = __float_as_uint(x == 0.0f ? 0.0f : x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// The value whose order_key is k.
__device__ __forceinline__ float key_value(unsigned int k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

__device__ __forceinline__ bool is_finite(float x) { return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u; }

__device__ __forceinline__ unsigned long long composite_key(float x, i64 i) {
    return ((unsigned long long)order_key(x) << 32) | (unsigned long long)i;
}

// Block-wide minimum of a 64-bit value; every thread gets it. `scratch` holds 32 entries.
__device__ __forceinline__ unsigned long long block_min_u64(unsigned long long v, unsigned long long* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) {
        unsigned long long w = __shfl_xor_sync(0xffffffffu, v, o);
        v = w < v ? w : v;
    }
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    v = (threadIdx.x < warps) ? scratch[threadIdx.x] : ~0ull;
    if (warp == 0) {
        for (int o = 16; o > 0; o >>= 1) {
            unsigned long long w = __shfl_xor_sync(0xffffffffu, v, o);
            v = w < v ? w : v;
        }
    }
    if (threadIdx.x == 0) scratch[0] = v;
    __syncthreads();
    return scratch[0];
}

struct SampleScratch {
    double sums[32];
    unsigned long long keys[32];
    int hist[256];
    unsigned int digit;
    int remaining;
};

template <typename T>
__device__ __forceinline__ float logit(const T* row, i64 i) {
    return Io<T>::load(row, i);
}

// Where the block-per-row steps read a row. Both sources visit a thread's elements in the same
// order (i = threadIdx.x, then + blockDim.x, ...) and compute each weight w_i = exp(x_i - m) and
// mass p_i = w_i / Z by the same expression in double, so their sums, and so their tokens and
// filtered rows, are bit for bit the same. `each(f)` calls f(i, x) for the thread's elements;
// `each_weight(end, f)` calls f(i, x, w) for those with i < end and `each_mass(f)` f(i, x, p),
// where w and p are function objects (Row::Weight, Row::Mass: NVRTC takes no generic lambdas),
// evaluated only where the step needs them.
// - MemoryRow: any V. Every pass re-reads the row (it stays in L1/L2) and evaluates exp (and the
//   division) again, in the top-p search's ~64 passes and the draw's ~12. This was the whole
//   kernel until 2026-12-05: 8.4 ms for 8192 rows of 4096 codes on an H200 (2026-12-04), where
//   by a count of double-precision operations (not a profile) those evaluations dominate.
// - HeldRow<T, PER>: V <= PER * blockDim.x. A thread loads its PER logits once into registers;
//   their weights, then their masses once Z is known, are computed once into shared memory, so
//   a pass of a search is a compare and an add per element.
template <typename T>
struct MemoryRow {
    const T* row;
    i64 v;
    double m, z;
    struct Weight {
        float x;
        double m;
        __device__ __forceinline__ double operator()() const { return exp((double)x - m); }
    };
    struct Mass {
        float x;
        double m, z;
        __device__ __forceinline__ double operator()() const { return exp((double)x - m) / z; }
    };
    __device__ MemoryRow(const T* r, i64 n) : row(r), v(n), m(0.0), z(1.0) {}
    template <class F>
    __device__ __forceinline__ void each(F f) const {
        for (i64 i = threadIdx.x; i < v; i += blockDim.x) f(i, logit(row, i));
    }
    __device__ __forceinline__ void set_max(float max) { m = (double)max; }
    __device__ __forceinline__ void set_total(double total) { z = total; }
    template <class F>
    __device__ __forceinline__ void each_weight(i64 end, F f) const {
        for (i64 i = threadIdx.x; i < end; i += blockDim.x) {
            const float x = logit(row, i);
            f(i, x, Weight{x, m});
        }
    }
    template <class F>
    __device__ __forceinline__ void each_mass(F f) const {
        for (i64 i = threadIdx.x; i < v; i += blockDim.x) {
            const float x = logit(row, i);
            f(i, x, Mass{x, m, z});
        }
    }
};

// Logits a thread holds (HeldRow): 16 x 256 threads covers VAR's 4096 codes.
#define SAMPLE_PER_THREAD 16
// Blocks per multiprocessor sample_rows is compiled for: two (128 registers) compile without
// spills on sm_90 (ptxas, NVRTC 13.0); filter_rows takes 192 registers and spills at 128, so
// it keeps one. A pass of the searches is short, and the block waits at its reductions' barriers:
// a second resident block is what fills those waits. On sm_80 ptxas spills 8 bytes at 128
// registers (the compile test refuses spills), so there it keeps one.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define SAMPLE_ROWS_BLOCKS 1
#else
#define SAMPLE_ROWS_BLOCKS 2
#endif

template <typename T, int PER>
struct HeldRow {
    float x[PER];
    // w_i after set_max, p_i = w_i / Z after set_total, in shared memory (thread t's element j
    // at j * blockDim.x + t: conflict-free): in registers as well they took the kernel to 182
    // registers, one block per multiprocessor.
    double* c;
    int v;  // <= PER * blockDim.x, so indices fit in 32 bits
    // A weight or mass already computed.
    struct Held {
        double value;
        __device__ __forceinline__ double operator()() const { return value; }
    };
    typedef Held Weight;
    typedef Held Mass;
    __device__ HeldRow(const T* row, i64 n, double* cache) : c(cache), v((int)n) {
#pragma unroll
        for (int j = 0; j < PER; ++j) {
            const int i = threadIdx.x + j * blockDim.x;
            x[j] = i < v ? logit(row, i) : 0.0f;
        }
    }
    template <class F>
    __device__ __forceinline__ void each(F f) const {
#pragma unroll
        for (int j = 0; j < PER; ++j) {
            const int i = threadIdx.x + j * blockDim.x;
            if (i < v) f((i64)i, x[j]);
        }
    }
    __device__ __forceinline__ void set_max(float max) {
#pragma unroll
        for (int j = 0; j < PER; ++j) c[j * blockDim.x + threadIdx.x] = exp((double)x[j] - (double)max);
    }
    __device__ __forceinline__ void set_total(double total) {
#pragma unroll
        for (int j = 0; j < PER; ++j) c[j * blockDim.x + threadIdx.x] = c[j * blockDim.x + threadIdx.x] / total;
    }
    // Only between set_max and set_total.
    template <class F>
    __device__ __forceinline__ void each_weight(i64 end, F f) const {
#pragma unroll
        for (int j = 0; j < PER; ++j) {
            const int i = threadIdx.x + j * blockDim.x;
            if (i < end) f((i64)i, x[j], Held{c[i]});
        }
    }
    // Only after set_total.
    template <class F>
    __device__ __forceinline__ void each_mass(F f) const {
#pragma unroll
        for (int j = 0; j < PER; ++j) {
            const int i = threadIdx.x + j * blockDim.x;
            if (i < v) f((i64)i, x[j], Held{c[i]});
        }
    }
};

// What steps 0-2 decide for one row. A logit x at index i is kept when its key is >= kth and,
// when top-p drops some, its composite key is above `cut` or is `last` (the largest of all).
struct RowFilter {
    unsigned long long bad;  // the first non-finite logit's index, or v when there is none
    float m;                 // the row maximum
    unsigned int kth;        // 0: top-k keeps all
    unsigned long long cut;  // drop kept composite keys <= cut (when dropping)
    unsigned long long last;
    bool dropping;

    __device__ __forceinline__ bool keeps(float x, i64 i) const {
        if (order_key(x) < kth) return false;
        if (dropping) {
            unsigned long long c = composite_key(x, i);
            if (c <= cut && c != last) return false;
        }
        return true;
    }
};

// Steps 0-2 for one row, by the whole block (every thread gets the same result). Leaves the
// row's weights (and, with top-p, masses) set for the draw.
template <typename Row>
__device__ RowFilter filter_row(Row& row, i64 v, i64 top_k, double top_p, SampleScratch& s) {
    RowFilter f;
    f.kth = 0;
    f.cut = 0;
    f.last = 0;
    f.dropping = false;
    f.m = 0.0f;
    // 0. The first non-finite logit (its index, or v when there is none); and the maximum.
    unsigned long long bad = (unsigned long long)v;
    unsigned long long top = 0;  // the largest value key, which is the maximum
    row.each([&](i64 i, float x) {
        if (!is_finite(x)) {
            if ((unsigned long long)i < bad) bad = (unsigned long long)i;
        } else {
            unsigned long long k = order_key(x);
            top = k > top ? k : top;
        }
    });
    f.bad = block_min_u64(bad, s.keys);
    if (f.bad < (unsigned long long)v) return f;
    top = ~block_min_u64(~top, s.keys);
    const unsigned int top_key = (unsigned int)top;
    const float m = key_value(top_key);
    f.m = m;
    row.set_max(m);

    // 1. top-k: the k-th largest key by radix select (most significant digit first).
    unsigned int kth = 0;  // keep key >= kth
    if (top_k > 0 && top_k < v) {
        unsigned int prefix = 0, mask = 0;
        if (threadIdx.x == 0) s.remaining = (int)top_k;
        for (int shift = 24; shift >= 0; shift -= 8) {
            for (int b = threadIdx.x; b < 256; b += blockDim.x) s.hist[b] = 0;
            __syncthreads();
            row.each([&](i64, float x) {
                unsigned int k = order_key(x);
                if ((k & mask) == prefix) atomicAdd(&s.hist[(k >> shift) & 255u], 1);
            });
            __syncthreads();
            if (threadIdx.x == 0) {
                int need = s.remaining, seen = 0;
                int d = 255;
                for (; d > 0; --d) {
                    if (seen + s.hist[d] >= need) break;
                    seen += s.hist[d];
                }
                s.digit = (unsigned int)d;
                s.remaining = need - seen;
            }
            __syncthreads();
            prefix |= s.digit << shift;
            mask |= 255u << shift;
        }
        kth = prefix;
    }
    f.kth = kth;

    // 2. top-p: the largest 64-bit key whose mass is <= (1 - top_p) Z; kept logits at or
    // below it are dropped, except the largest key of all.
    if (top_p > 0.0) {
        double z = 0.0;
        row.each_weight(v, [&](i64, float x, const typename Row::Weight& w) {
            if (order_key(x) >= kth) z += w();
        });
        z = block_sum(z, s.sums);
        row.set_total(z);
        const double limit = 1.0 - top_p;
        unsigned long long lo = 0, hi = ~0ull;
        while (lo < hi) {
            unsigned long long mid = lo + (hi - lo) / 2 + 1;
            double mass = 0.0;
            row.each_mass([&](i64 i, float x, const typename Row::Mass& p) {
                if (order_key(x) >= kth && composite_key(x, i) <= mid) mass += p();
            });
            mass = block_sum(mass, s.sums);
            if (mass <= limit) lo = mid;
            else hi = mid - 1;
        }
        f.cut = lo;
        f.dropping = lo > 0;
    }
    // The largest key of all is never dropped: the maximum value at its largest index.
    if (f.dropping) {
        unsigned long long mine = ~0ull;
        row.each([&](i64 i, float x) {
            if (order_key(x) == top_key) {
                unsigned long long k = ~composite_key(x, i);
                mine = k < mine ? k : mine;
            }
        });
        f.last = ~block_min_u64(mine, s.keys);
    }
    return f;
}

// Steps 0-3 for one row: the token, or -1 - (the first non-finite logit's index).
template <typename Row>
__device__ i64 sample_row(Row& row, i64 v, double u, i64 top_k, double top_p, SampleScratch& s) {
    const RowFilter f = filter_row(row, v, top_k, top_p, s);
    if (f.bad < (unsigned long long)v) return -1 - (i64)f.bad;
    // 3. The draw over what is left, in index order, by weight (which top-p turned into masses
    // in a HeldRow: back to weights).
    if (top_p > 0.0) row.set_max(f.m);
    double total = 0.0;
    row.each_weight(v, [&](i64 i, float x, const typename Row::Weight& w) {
        if (f.keeps(x, i)) total += w();
    });
    total = block_sum(total, s.sums);
    const double target = u * total;
    // The smallest index whose running sum exceeds the target (v when none does).
    i64 lo = 0, hi = v;
    while (lo < hi) {
        i64 mid = lo + (hi - lo) / 2;
        double run = 0.0;
        row.each_weight(mid + 1, [&](i64 i, float x, const typename Row::Weight& w) {
            if (f.keeps(x, i)) run += w();
        });
        run = block_sum(run, s.sums);
        if (run > target) hi = mid;
        else lo = mid + 1;
    }
    if (lo < v) return lo;
    // Rounding left the target at or past the total: the largest index with weight.
    unsigned long long mine = ~0ull;
    row.each_weight(v, [&](i64 i, float x, const typename Row::Weight& w) {
        if (f.keeps(x, i) && w() > 0.0) mine = ~(unsigned long long)i < mine ? ~(unsigned long long)i : mine;
    });
    return (i64)~block_min_u64(mine, s.keys);
}

// Whether a row of v logits goes through HeldRow: the host asks for it (hold_rows) and the
// row fits the block (SAMPLE_PER_THREAD logits a thread, the shared cache's size).
__device__ __forceinline__ bool row_is_held(int hold_rows, i64 v) {
    return hold_rows && blockDim.x <= SAMPLE_THREADS && v <= (i64)SAMPLE_PER_THREAD * blockDim.x;
}

template <typename T>
__device__ void sample_rows_impl(i64* tokens, const T* logits, const double* uniform, i64 rows, i64 v, i64 top_k,
                                 double top_p, int hold_rows) {
    __shared__ SampleScratch s;
    __shared__ double cache[SAMPLE_PER_THREAD * SAMPLE_THREADS];
    const bool held_rows = row_is_held(hold_rows, v);
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* row = logits + r * v;
        i64 token;
        if (held_rows) {
            HeldRow<T, SAMPLE_PER_THREAD> held(row, v, cache);
            token = sample_row(held, v, uniform[r], top_k, top_p, s);
        } else {
            MemoryRow<T> read(row, v);
            token = sample_row(read, v, uniform[r], top_k, top_p, s);
        }
        if (threadIdx.x == 0) tokens[r] = token;
    }
}

// The filter alone (the official in-place filtering that more_smooth's Gumbel softmax reads):
// out = the row with every logit the draw could not pick set to -inf, kept ones copied bit for
// bit; status[r] = 0, or -1 - (the first non-finite logit's index), the row then left unwritten.
template <typename T, typename Row>
__device__ void filter_one_row(T* out, i64* status, const T* row, Row& held, i64 v, i64 top_k, double top_p,
                               SampleScratch& s) {
    const float neg_inf = __int_as_float(0xff800000);
    const RowFilter f = filter_row(held, v, top_k, top_p, s);
    const bool bad = f.bad < (unsigned long long)v;
    if (threadIdx.x == 0) *status = bad ? -1 - (i64)f.bad : 0;
    if (bad) return;
    held.each([&](i64 i, float x) {
        if (f.keeps(x, i)) out[i] = row[i];
        else Io<T>::store(out, i, neg_inf);
    });
}

template <typename T>
__device__ void filter_rows_impl(T* out, i64* status, const T* logits, i64 rows, i64 v, i64 top_k, double top_p,
                                 int hold_rows) {
    __shared__ SampleScratch s;
    __shared__ double cache[SAMPLE_PER_THREAD * SAMPLE_THREADS];
    const bool held_rows = row_is_held(hold_rows, v);
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* row = logits + r * v;
        if (held_rows) {
            HeldRow<T, SAMPLE_PER_THREAD> held(row, v, cache);
            filter_one_row(out + r * v, status + r, row, held, v, top_k, top_p, s);
        } else {
            MemoryRow<T> read(row, v);
            filter_one_row(out + r * v, status + r, row, read, v, top_k, top_p, s);
        }
    }
}

// One thread per row, the same steps with plain loops: the reference variant for the benches.
template <typename T>
__device__ void sample_rows_naive_impl(i64* tokens, const T* logits, const double* uniform, i64 rows, i64 v,
                                       i64 top_k, double top_p) {
    GRID_STRIDE(r, rows) {
        const T* row = logits + r * v;
        i64 bad = -1;
        unsigned int top_key = 0;
        for (i64 i = 0; i < v && bad < 0; ++i) {
            float x = logit(row, i);
            if (!is_finite(x)) bad = i;
            else if (order_key(x) > top_key) top_key = order_key(x);
        }
        if (bad >= 0) {
            tokens[r] = -1 - bad;
            continue;
        }
        const double m = (double)key_value(top_key);
        // k-th largest key: the largest key with at least k keys >= it (binary search on keys).
        unsigned int kth = 0;
        if (top_k > 0 && top_k < v) {
            unsigned int lo = 0, hi = top_key;
            while (lo < hi) {
                unsigned int mid = lo + (hi - lo) / 2 + 1;
                i64 count = 0;
                for (i64 i = 0; i < v; ++i) count += order_key(logit(row, i)) >= mid;
                if (count >= top_k) lo = mid;
                else hi = mid - 1;
            }
            kth = lo;
        }
        unsigned long long cut = 0, last = 0;
        if (top_p > 0.0) {
            double z = 0.0;
            for (i64 i = 0; i < v; ++i) {
                float x = logit(row, i);
                if (order_key(x) >= kth) {
                    z += exp((double)x - m);
                    unsigned long long c = composite_key(x, i);
                    last = c > last ? c : last;
                }
            }
            unsigned long long lo = 0, hi = ~0ull;
            while (lo < hi) {
                unsigned long long mid = lo + (hi - lo) / 2 + 1;
                double mass = 0.0;
                for (i64 i = 0; i < v; ++i) {
                    float x = logit(row, i);
                    if (order_key(x) >= kth && composite_key(x, i) <= mid) mass += exp((double)x - m) / z;
                }
                if (mass <= 1.0 - top_p) lo = mid;
                else hi = mid - 1;
            }
            cut = lo;
        }
        double total = 0.0;
        for (int pass = 0; pass < 2; ++pass) {
            const double target = uniform[r] * total;
            double run = 0.0;
            i64 token = -1, last_kept = 0;
            for (i64 i = 0; i < v; ++i) {
                float x = logit(row, i);
                unsigned long long c = composite_key(x, i);
                if (order_key(x) < kth || (cut > 0 && c <= cut && c != last)) continue;
                run += exp((double)x - m);
                last_kept = i;
                if (pass == 1 && token < 0 && run > target) token = i;
            }
            if (pass == 0) total = run;
            else tokens[r] = token >= 0 ? token : last_kept;
        }
    }
}

#define SAMPLE_KERNELS(T, S)                                                                                      \
    extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS, SAMPLE_ROWS_BLOCKS)                              \
        sample_rows_##S(i64* tokens, const T* logits, const double* uniform, i64 rows, i64 v, i64 top_k,          \
                        double top_p, int hold_rows) {                                                            \
        sample_rows_impl<T>(tokens, logits, uniform, rows, v, top_k, top_p, hold_rows);                           \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)                                                  \
        sample_rows_naive_##S(i64* tokens, const T* logits, const double* uniform, i64 rows, i64 v, i64 top_k,    \
                              double top_p) {                                                                     \
        sample_rows_naive_impl<T>(tokens, logits, uniform, rows, v, top_k, top_p);                                \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)                                                  \
        filter_rows_##S(T* out, i64* status, const T* logits, i64 rows, i64 v, i64 top_k, double top_p,           \
                        int hold_rows) {                                                                          \
        filter_rows_impl<T>(out, status, logits, rows, v, top_k, top_p, hold_rows);                               \
    }

SAMPLE_KERNELS(float, f32)
SAMPLE_KERNELS(bf16_t, bf16)
