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
// Every step is a pass over the row (re-read from global memory; the 16 KB row of a 4096-code
// vocabulary stays in L1/L2) followed by a block-wide reduction that every thread receives:
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

// Steps 0-2 for one row, by the whole block (every thread gets the same result).
template <typename T>
__device__ RowFilter filter_row(const T* row, i64 v, i64 top_k, double top_p, SampleScratch& s) {
    RowFilter f;
    f.kth = 0;
    f.cut = 0;
    f.last = 0;
    f.dropping = false;
    f.m = 0.0f;
    // 0. The first non-finite logit (its index, or v when there is none); and the maximum.
    unsigned long long bad = (unsigned long long)v;
    unsigned long long top = 0;  // the largest value key, which is the maximum
    for (i64 i = threadIdx.x; i < v; i += blockDim.x) {
        float x = logit(row, i);
        if (!is_finite(x)) {
            if ((unsigned long long)i < bad) bad = (unsigned long long)i;
        } else {
            unsigned long long k = order_key(x);
            top = k > top ? k : top;
        }
    }
    f.bad = block_min_u64(bad, s.keys);
    if (f.bad < (unsigned long long)v) return f;
    top = ~block_min_u64(~top, s.keys);
    const unsigned int top_key = (unsigned int)top;
    const float m = key_value(top_key);
    f.m = m;

    // 1. top-k: the k-th largest key by radix select (most significant digit first).
    unsigned int kth = 0;  // keep key >= kth
    if (top_k > 0 && top_k < v) {
        unsigned int prefix = 0, mask = 0;
        if (threadIdx.x == 0) s.remaining = (int)top_k;
        for (int shift = 24; shift >= 0; shift -= 8) {
            for (int b = threadIdx.x; b < 256; b += blockDim.x) s.hist[b] = 0;
            __syncthreads();
            for (i64 i = threadIdx.x; i < v; i += blockDim.x) {
                unsigned int k = order_key(logit(row, i));
                if ((k & mask) == prefix) atomicAdd(&s.hist[(k >> shift) & 255u], 1);
            }
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
        for (i64 i = threadIdx.x; i < v; i += blockDim.x) {
            float x = logit(row, i);
            if (order_key(x) >= kth) z += exp((double)x - (double)m);
        }
        z = block_sum(z, s.sums);
        const double limit = 1.0 - top_p;
        unsigned long long lo = 0, hi = ~0ull;
        while (lo < hi) {
            unsigned long long mid = lo + (hi - lo) / 2 + 1;
            double mass = 0.0;
            for (i64 i = threadIdx.x; i < v; i += blockDim.x) {
                float x = logit(row, i);
                if (order_key(x) >= kth && composite_key(x, i) <= mid) mass += exp((double)x - (double)m) / z;
            }
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
        for (i64 i = threadIdx.x; i < v; i += blockDim.x) {
            float x = logit(row, i);
            if (order_key(x) == top_key) {
                unsigned long long k = ~composite_key(x, i);
                mine = k < mine ? k : mine;
            }
        }
        f.last = ~block_min_u64(mine, s.keys);
    }
    return f;
}

template <typename T>
__device__ void sample_rows_impl(i64* tokens, const T* logits, const double* uniform, i64 rows, i64 v, i64 top_k,
                                 double top_p) {
    __shared__ SampleScratch s;
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* row = logits + r * v;
        const RowFilter f = filter_row(row, v, top_k, top_p, s);
        if (f.bad < (unsigned long long)v) {
            if (threadIdx.x == 0) tokens[r] = -1 - (i64)f.bad;
            continue;
        }
        // 3. The draw over what is left, in index order.
        auto weight = [&](i64 i) -> double {
            float x = logit(row, i);
            return f.keeps(x, i) ? exp((double)x - (double)f.m) : 0.0;
        };
        double total = 0.0;
        for (i64 i = threadIdx.x; i < v; i += blockDim.x) total += weight(i);
        total = block_sum(total, s.sums);
        const double target = uniform[r] * total;
        // The smallest index whose running sum exceeds the target (v when none does).
        i64 lo = 0, hi = v;
        while (lo < hi) {
            i64 mid = lo + (hi - lo) / 2;
            double run = 0.0;
            for (i64 i = threadIdx.x; i <= mid; i += blockDim.x) run += weight(i);
            run = block_sum(run, s.sums);
            if (run > target) hi = mid;
            else lo = mid + 1;
        }
        i64 token = lo;
        if (token >= v) {
            // Rounding left the target at or past the total: the largest index with weight.
            unsigned long long mine = ~0ull;
            for (i64 i = threadIdx.x; i < v; i += blockDim.x) {
                if (weight(i) > 0.0) mine = ~(unsigned long long)i < mine ? ~(unsigned long long)i : mine;
            }
            token = (i64)~block_min_u64(mine, s.keys);
        }
        if (threadIdx.x == 0) tokens[r] = token;
    }
}

// The filter alone (the official in-place filtering that more_smooth's Gumbel softmax reads):
// out = the row with every logit the draw could not pick set to -inf, kept ones copied bit for
// bit; status[r] = 0, or -1 - (the first non-finite logit's index), the row then left unwritten.
template <typename T>
__device__ void filter_rows_impl(T* out, i64* status, const T* logits, i64 rows, i64 v, i64 top_k, double top_p) {
    __shared__ SampleScratch s;
    const float neg_inf = __int_as_float(0xff800000);
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* row = logits + r * v;
        const RowFilter f = filter_row(row, v, top_k, top_p, s);
        const bool bad = f.bad < (unsigned long long)v;
        if (threadIdx.x == 0) status[r] = bad ? -1 - (i64)f.bad : 0;
        if (bad) continue;
        for (i64 i = threadIdx.x; i < v; i += blockDim.x) {
            if (f.keeps(logit(row, i), i)) out[r * v + i] = row[i];
            else Io<T>::store(out + r * v, i, neg_inf);
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
    extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)                                                  \
        sample_rows_##S(i64* tokens, const T* logits, const double* uniform, i64 rows, i64 v, i64 top_k,          \
                        double top_p) {                                                                           \
        sample_rows_impl<T>(tokens, logits, uniform, rows, v, top_k, top_p);                                      \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)                                                  \
        sample_rows_naive_##S(i64* tokens, const T* logits, const double* uniform, i64 rows, i64 v, i64 top_k,    \
                              double top_p) {                                                                     \
        sample_rows_naive_impl<T>(tokens, logits, uniform, rows, v, top_k, top_p);                                \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)                                                  \
        filter_rows_##S(T* out, i64* status, const T* logits, i64 rows, i64 v, i64 top_k, double top_p) {        \
        filter_rows_impl<T>(out, status, logits, rows, v, top_k, top_p);                                          \
    }

SAMPLE_KERNELS(float, f32)
SAMPLE_KERNELS(bf16_t, bf16)
