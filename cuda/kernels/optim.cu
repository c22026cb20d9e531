// optim.cu: the fused multi-tensor AdamW step and the multi-tensor sum of squares behind
// global-norm gradient clipping.
//
// Layout: every tensor is a dense buffer of `len` elements. The host uploads a table with one
// `TensorEntry` per tensor (raw device pointers, length, start offset, flags; mirrored by
// `mvar_cuda::ops::optim::pack_table`). The tensors are laid end to end in one flattened element
// space: entry k covers the flat indices [start_k, start_k + len_k); the host drops empty tensors,
// so the starts are strictly increasing and the entry holding flat index e is the last one with
// start <= e (a binary search over the table).
// Parallel decomposition: one thread per flat element, grid-stride loop, 256 threads a block, one
// launch for all tensors. Consecutive threads read consecutive elements of one tensor, so loads
// coalesce; a thread keeps the entry of its previous element and searches again only when its
// next element lies outside it. Threads never share an element, so there are no atomics in the
// update; the host splits the step into several launches when two entries name the same
// parameter buffer (tied weights), which keeps the CPU's one-after-the-other semantics.
// - adamw_multi: PyTorch's AdamW update of the f32 master weights and the f32 moments in place;
//   gradients are f32 or bf16 (flag bit 1), read through Io.
// - sumsq_multi: each thread sums g^2 over its elements, the block reduces them (block_sum:
//   warp shuffles, then the warps' totals), and thread 0 writes the block's total to its own slot of `partials`; the host reads the
//   partials back (the one synchronisation it needs anyway) and adds them in block order. No
//   atomics: an atomic add into one double would finish in the blocks' arrival order, so the
//   norm's last bits (and through clipping, the weights) could differ between two runs of the
//   same seed; with fixed partials a CUDA training run repeats to the bit.
// Numerics: the AdamW update uses round-to-nearest intrinsics (__fmul_rn, __fadd_rn, ...) so that
// no multiply-add is contracted into an FMA: each operation rounds exactly as the CPU reference's
// f32 code does, and an f32 step matches it to the bit. The sum of squares accumulates in double:
// squares of f32 gradients above ~1.8e19 would overflow f32 and report an infinite norm where the
// CPU reference (f64) reports a finite one and clips; the cost is negligible next to the loads.

#define ENTRY_DECAY 1
#define ENTRY_GRAD_BF16 2

// Mirrors the seven i64 words per tensor of `pack_table`.
struct TensorEntry {
    i64 param;  // float*: the parameter (0 in the sum-of-squares table)
    i64 grad;   // float* or bf16_t* (ENTRY_GRAD_BF16)
    i64 m;      // float*: first moment (0 in the sum-of-squares table)
    i64 v;      // float*: second moment (0 in the sum-of-squares table)
    i64 len;    // elements, > 0
    i64 start;  // flat index of element 0
    i64 flags;  // ENTRY_* bits
};

// Hyper-parameters of one step, already rounded to f32 by the host exactly as the CPU reference
// rounds them (mirrors `AdamWHyper`).
struct AdamHyper {
    float decay;            // 1 - lr * weight_decay, applied to entries with ENTRY_DECAY
    float beta1;
    float beta2;
    float one_minus_beta1;
    float one_minus_beta2;
    float step_size;        // lr / (1 - beta1^t)
    float bias2_sqrt;       // sqrt(1 - beta2^t)
    float eps;
};

// The entry whose range holds flat index e (0 <= e < total).
__device__ __forceinline__ int find_entry(const TensorEntry* table, int count, i64 e) {
    int lo = 0, hi = count - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if (table[mid].start <= e) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

// Advances `k` to the entry holding e, searching only when e has left entry k.
__device__ __forceinline__ int entry_for(const TensorEntry* table, int count, int k, i64 e) {
    i64 s = table[k].start;
    if (e >= s && e < s + table[k].len) return k;
    return find_entry(table, count, e);
}

template <typename G>
__device__ __forceinline__ void adamw_element(const TensorEntry& t, i64 j, const AdamHyper& h) {
    float* p = reinterpret_cast<float*>(t.param);
    float* m = reinterpret_cast<float*>(t.m);
    float* v = reinterpret_cast<float*>(t.v);
    float g = Io<G>::load(reinterpret_cast<const G*>(t.grad), j);
    float pj = p[j];
    // Multiplying by exactly 1 (no decay) changes nothing, so skipping it matches the CPU.
    if (t.flags & ENTRY_DECAY) pj = __fmul_rn(pj, h.decay);
    float mj = __fadd_rn(__fmul_rn(h.beta1, m[j]), __fmul_rn(h.one_minus_beta1, g));
    float vj = __fadd_rn(__fmul_rn(h.beta2, v[j]), __fmul_rn(__fmul_rn(h.one_minus_beta2, g), g));
    float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vj), h.bias2_sqrt), h.eps);
    pj = __fsub_rn(pj, __fdiv_rn(__fmul_rn(h.step_size, mj), denom));
    p[j] = pj;
    m[j] = mj;
    v[j] = vj;
}

extern "C" __global__ void adamw_multi(const TensorEntry* table, int count, i64 total, AdamHyper h) {
    int k = 0;
    GRID_STRIDE(e, total) {
        k = entry_for(table, count, k, e);
        const TensorEntry t = table[k];
        i64 j = e - t.start;
        if (t.flags & ENTRY_GRAD_BF16) adamw_element<bf16_t>(t, j, h);
        else adamw_element<float>(t, j, h);
    }
}

// Launched with blockDim.x a multiple of 32 (256); `partials` has one double per block, each
// written once (no zero fill needed).
extern "C" __global__ void sumsq_multi(const TensorEntry* table, int count, i64 total,
                                       double* partials) {
    __shared__ double scratch[32];
    double s = 0.0;
    int k = 0;
    GRID_STRIDE(e, total) {
        k = entry_for(table, count, k, e);
        const TensorEntry& t = table[k];
        i64 j = e - t.start;
        float g = (t.flags & ENTRY_GRAD_BF16)
                      ? Io<bf16_t>::load(reinterpret_cast<const bf16_t*>(t.grad), j)
                      : Io<float>::load(reinterpret_cast<const float*>(t.grad), j);
        double gd = (double)g;
        s += gd * gd;
    }
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
}
