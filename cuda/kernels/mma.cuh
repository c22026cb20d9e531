// mma.cuh: bf16 tensor-core building blocks shared by the tiled attention kernels (na2d.cu,
// attention.cu). A kernel file takes them with an include line naming this file, which the
// loader replaces by this text (cuda/src/kernels.rs). They need sm_80 or newer (mma.sync
// m16n8k16 bf16, ldmatrix, cp.async); the host only picks the kernels that use them on such a
// device.
//
// Fragment conventions (PTX ISA, mma.m16n8k16 with .row.col): in a warp, lane = 4 g + t
// (g = lane / 4, t = lane % 4).
// - A (16 x 16, bf16x2 registers a[0..3]): a[0] rows g, columns 2t, 2t + 1; a[1] row g + 8;
//   a[2] row g, columns 8 + 2t, 8 + 2t + 1; a[3] row g + 8, same columns.
// - B (16 x 8): b0 holds k = 2t, 2t + 1 of column g, b1 k = 8 + 2t, 8 + 2t + 1.
// - C (16 x 8, f32 c[0..3]): c[0], c[1] row g, columns 2t, 2t + 1; c[2], c[3] row g + 8.
// A "16-token tile" is 16 rows of D bf16 values; staged tiles in shared memory use a row pitch
// of D + 8 elements (2 D + 16 bytes, an odd number of 16-byte units when D is a multiple of 16,
// so the eight row addresses of one ldmatrix phase fall in different banks).
//
// Under the CPU emulator (MVAR_CUDA_EMU) the warp collectives and cp.async are emulated in
// cuda/emu/device.h (a copy lands when issued, or, with MVAR_EMU_CP_ASYNC=deferred, only when a
// wait forces it: both legal schedules), so the same kernels run and are checked there.

#define MMA_FULL 0xffffffffu

// Compiled for an older GPU (the whole file is compiled for the device's architecture, also
// where the host never launches these kernels), the instructions become traps.
#if !defined(MVAR_CUDA_EMU) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define MMA_UNSUPPORTED 1
#endif

__device__ __forceinline__ unsigned mma_smem_addr(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}

// ldmatrix .x4: four 8 x 8 b16 matrices; lanes 8i .. 8i + 7 give the row addresses of matrix i.
__device__ __forceinline__ void mma_ldsm(unsigned (&r)[4], unsigned addr) {
#ifdef MVAR_CUDA_EMU
    mvar_emu_ldmatrix_x4(r, addr, false);
#elif defined(MMA_UNSUPPORTED)
    r[0] = r[1] = r[2] = r[3] = addr;
    __trap();
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
#endif
}

// The same, each matrix transposed.
__device__ __forceinline__ void mma_ldsm_t(unsigned (&r)[4], unsigned addr) {
#ifdef MVAR_CUDA_EMU
    mvar_emu_ldmatrix_x4(r, addr, true);
#elif defined(MMA_UNSUPPORTED)
    r[0] = r[1] = r[2] = r[3] = addr;
    __trap();
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
#endif
}

// c (16 x 8, f32) += a (16 x 16, bf16) * b (16 x 8, bf16).
__device__ __forceinline__ void mma_bf16_16x8x16(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
#ifdef MVAR_CUDA_EMU
    mvar_emu_mma_m16n8k16_bf16(c, a, b0, b1);
#elif defined(MMA_UNSUPPORTED)
    __trap();
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Two floats as bf16x2 (lo in the low half), rounded to nearest even like every other store. On
// the GPU one cvt.rn.bf16x2.f32 (F2FP) does the pair; f32_to_bf16's integer rounding took about
// ten instructions an element (tools/sass.py), which for the probabilities packed as A operands
// was a third of the neighbourhood-attention forward's chunk loop. Only a NaN's payload differs
// (the instruction gives the canonical NaN, f32_to_bf16 keeps the sign and high payload bits).
// MVAR_MMA_PORTABLE (set by the host from the environment variable of that name) keeps the
// integer code here and exp2f below, for comparison on a GPU.
__device__ __forceinline__ unsigned mma_pack(float lo, float hi) {
#if defined(MVAR_CUDA_EMU) || defined(MMA_UNSUPPORTED) || defined(MVAR_MMA_PORTABLE)
    return (unsigned)f32_to_bf16(lo) | ((unsigned)f32_to_bf16(hi) << 16);
#else
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#endif
}

// 2^x for the tensor-core kernels' probabilities: ex2.approx.ftz, one MUFU.EX2 (exp2f adds a
// compare and two conditional multiplies around it to keep results below 2^-126 subnormal).
// Its relative error (about 2^-22) and the flush of results below 2^-126 to 0 are far below the
// bf16 rounding these probabilities get as mma operands. The emulator computes exp2f.
__device__ __forceinline__ float mma_exp2(float x) {
#if defined(MVAR_CUDA_EMU) || defined(MMA_UNSUPPORTED) || defined(MVAR_MMA_PORTABLE)
    return exp2f(x);
#else
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(x));
    return r;
#endif
}

// The 16 x 16 block in accumulator layout ([n-tile][c0..c3]) as an A operand.
__device__ __forceinline__ void mma_to_a(unsigned (&a)[4], const float (&s)[2][4]) {
    a[0] = mma_pack(s[0][0], s[0][1]);
    a[1] = mma_pack(s[0][2], s[0][3]);
    a[2] = mma_pack(s[1][0], s[1][1]);
    a[3] = mma_pack(s[1][2], s[1][3]);
}

// A fragments of a 16-token x D tile read straight from global memory: rows `ra` (tile row g)
// and `rb` (tile row g + 8), zero when the row is not valid or the column is at or past `d`
// (d even, so a lane's pair of columns is either inside or outside).
template <int D>
__device__ __forceinline__ void mma_ldg_a(unsigned (&a)[D / 16][4], const bf16_t* ra, const bf16_t* rb, bool oka,
                                          bool okb, int d = D) {
    int c = 2 * (threadIdx.x & 3);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        int c0 = kk * 16 + c, c1 = c0 + 8;
        a[kk][0] = oka && c0 < d ? *reinterpret_cast<const unsigned*>(ra + c0) : 0u;
        a[kk][1] = okb && c0 < d ? *reinterpret_cast<const unsigned*>(rb + c0) : 0u;
        a[kk][2] = oka && c1 < d ? *reinterpret_cast<const unsigned*>(ra + c1) : 0u;
        a[kk][3] = okb && c1 < d ? *reinterpret_cast<const unsigned*>(rb + c1) : 0u;
    }
}

// s (16 x 16) = a (16 x D, registers) * b^T, b the 16 staged tokens x D at `b` (pitch D + 8).
template <int D>
__device__ __forceinline__ void mma_abt(float (&s)[2][4], const unsigned (&a)[D / 16][4], const bf16_t* b) {
    int lane = threadIdx.x & 31, i = lane >> 3, r = lane & 7;
    unsigned base = mma_smem_addr(b + (r + 8 * (i >> 1)) * (D + 8) + 8 * (i & 1));
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        unsigned f[4];
        mma_ldsm(f, base + kk * 32);
        mma_bf16_16x8x16(s[0], a[kk], f[0], f[1]);
        mma_bf16_16x8x16(s[1], a[kk], f[2], f[3]);
    }
}

// s (16 x 16) = a * b^T with both a (16 tokens x D) and b (16 staged tokens) in shared memory.
template <int D>
__device__ __forceinline__ void mma_abt_s(float (&s)[2][4], const bf16_t* a, const bf16_t* b) {
    int lane = threadIdx.x & 31, i = lane >> 3, r = lane & 7;
    unsigned abase = mma_smem_addr(a + (r + 8 * (i & 1)) * (D + 8) + 8 * (i >> 1));
    unsigned bbase = mma_smem_addr(b + (r + 8 * (i >> 1)) * (D + 8) + 8 * (i & 1));
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        unsigned af[4], f[4];
        mma_ldsm(af, abase + kk * 32);
        mma_ldsm(f, bbase + kk * 32);
        mma_bf16_16x8x16(s[0], af, f[0], f[1]);
        mma_bf16_16x8x16(s[1], af, f[2], f[3]);
    }
}

// acc (16 x D) += a (16 x 16 tokens, registers) * m, m the 16 staged tokens x D at `m`.
template <int D>
__device__ __forceinline__ void mma_av(float (&acc)[D / 8][4], const unsigned (&a)[4], const bf16_t* m) {
    int lane = threadIdx.x & 31, i = lane >> 3, r = lane & 7;
    unsigned base = mma_smem_addr(m + (r + 8 * (i & 1)) * (D + 8) + 8 * (i >> 1));
#pragma unroll
    for (int np = 0; np < D / 16; ++np) {
        unsigned f[4];
        mma_ldsm_t(f, base + np * 32);
        mma_bf16_16x8x16(acc[2 * np], a, f[0], f[1]);
        mma_bf16_16x8x16(acc[2 * np + 1], a, f[2], f[3]);
    }
}

// Stores a 16 x D accumulator (times `mul`) as bf16 rows `ra` (tile row g) and `rb` (g + 8),
// columns below `d` only (d even).
template <int D>
__device__ __forceinline__ void mma_store_c(bf16_t* ra, bf16_t* rb, bool oka, bool okb, const float (&acc)[D / 8][4],
                                            float mula, float mulb, int d = D) {
    int c = 2 * (threadIdx.x & 3);
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
        int col = nt * 8 + c;
        if (col >= d) continue;
        if (oka) *reinterpret_cast<unsigned*>(ra + col) = mma_pack(acc[nt][0] * mula, acc[nt][1] * mula);
        if (okb) *reinterpret_cast<unsigned*>(rb + col) = mma_pack(acc[nt][2] * mulb, acc[nt][3] * mulb);
    }
}

// Sum and max over the 4 lanes that share accumulator rows.
__device__ __forceinline__ float mma_quad_sum(float v) {
    v += __shfl_xor_sync(MMA_FULL, v, 1);
    return v + __shfl_xor_sync(MMA_FULL, v, 2);
}
__device__ __forceinline__ float mma_quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(MMA_FULL, v, 1));
    return fmaxf(v, __shfl_xor_sync(MMA_FULL, v, 2));
}

// The online softmax of the mma forwards (attention.cu, na2d.cu) with a lagging running max:
// a row's max `mr` moves only when the new scores' max passes it by more than `slack` (log2
// units), and then O (`acc`, the rows' accumulator columns) and the row sums `lr` are rescaled
// by exp2(old max - new max); p = exp2(s - mr) stays below 2^slack and the softmax is the same
// (out = O / sum, lse = max + log2 sum). `mx` is each lane's own max of its two rows' new
// scores: one vote tells the warp whether any row passed, so the usual case skips the rows'
// maxima over their four lanes (two shuffle rounds each). Whole warp.
template <int D>
__device__ __forceinline__ void mma_lazy_rescale(float (&acc)[D / 8][4], float (&mr)[2], float (&lr)[2],
                                                 const float (&mx)[2], float slack) {
    if (!__any_sync(MMA_FULL, mx[0] > mr[0] + slack || mx[1] > mr[1] + slack)) return;
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
        const float cmax = mma_quad_max(mx[rr]);  // uniform over the row's four lanes
        if (cmax > mr[rr] + slack) {
            const float alpha = mma_exp2(mr[rr] - cmax);  // 0 from -inf
            lr[rr] *= alpha;
#pragma unroll
            for (int nt = 0; nt < D / 8; ++nt) {
                acc[nt][2 * rr] *= alpha;
                acc[nt][2 * rr + 1] *= alpha;
            }
            mr[rr] = cmax;
        }
    }
}

// cp.async of 16 bytes global -> shared, bypassing L1; `valid` false writes 16 zero bytes (the
// source size operand 0) and reads nothing. Both addresses 16-byte aligned.
__device__ __forceinline__ void mma_cp_async16(void* smem, const void* gmem, bool valid) {
#ifdef MVAR_CUDA_EMU
    mvar_emu_cp_async16(smem, valid ? gmem : nullptr);
#elif defined(MMA_UNSUPPORTED)
    __trap();
#else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(mma_smem_addr(smem)), "l"(gmem),
                 "r"(valid ? 16 : 0));
#endif
}

// Closes the group of cp.async issued since the last commit.
__device__ __forceinline__ void mma_cp_commit() {
#ifdef MVAR_CUDA_EMU
    mvar_emu_cp_commit();
#elif !defined(MMA_UNSUPPORTED)
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most N committed groups of this thread are still in flight.
template <int N>
__device__ __forceinline__ void mma_cp_wait() {
#ifdef MVAR_CUDA_EMU
    mvar_emu_cp_wait(N);
#elif !defined(MMA_UNSUPPORTED)
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}
