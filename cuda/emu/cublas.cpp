// cublas.cpp: libcublas.so of mvar's CUDA emulator: the handle calls and cublasGemmStridedBatchedEx
// (the one GEMM mvar issues) on the CPU, column-major as cuBLAS defines it, for f32 and bf16 data
// with f32 accumulation (the rounding of each output to bf16 as the GPU stores it). TF32 compute
// is computed in full f32: the emulator checks the layout arithmetic, not TF32 rounding.
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <algorithm>
#include <initializer_list>
#include <thread>
#include <vector>

#include "host_cost.h"

typedef int cublasStatus_t;
enum {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_NOT_INITIALIZED = 1,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_NOT_SUPPORTED = 15,
};
enum { CUDA_R_32F = 0, CUDA_R_16BF = 14 };
enum { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1, CUBLAS_OP_C = 2 };
enum { CUBLAS_COMPUTE_32F = 68, CUBLAS_COMPUTE_32F_FAST_TF32 = 77 };

#define API extern "C" __attribute__((visibility("default")))

namespace {

struct Handle {
    void* stream = nullptr;
};

float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

uint16_t f32_to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

float load(const void* p, int type, int64_t i) {
    return type == CUDA_R_32F ? static_cast<const float*>(p)[i] : bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
}

void store(void* p, int type, int64_t i, float v) {
    if (type == CUDA_R_32F) {
        static_cast<float*>(p)[i] = v;
    } else {
        static_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
    }
}

using mvar_emu_host_cost::kernels_skipped;

std::atomic<unsigned long long> g_gemm_calls{0};

struct StatsAtExit {
    ~StatsAtExit() {
        if (!mvar_emu_host_cost::stats_wanted()) return;
        fprintf(stderr, "mvar CUDA emulator: %llu cuBLAS GEMM calls\n", g_gemm_calls.load());
    }
} g_stats_at_exit;

}  // namespace

API cublasStatus_t cublasCreate_v2(void** handle) {
    *handle = new Handle;
    return CUBLAS_STATUS_SUCCESS;
}

API cublasStatus_t cublasDestroy_v2(void* handle) {
    delete static_cast<Handle*>(handle);
    return CUBLAS_STATUS_SUCCESS;
}

API cublasStatus_t cublasSetStream_v2(void* handle, void* stream) {
    if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
    static_cast<Handle*>(handle)->stream = stream;
    return CUBLAS_STATUS_SUCCESS;
}

// The emulator needs no scratch memory: the workspace is accepted and never touched.
API cublasStatus_t cublasSetWorkspace_v2(void* handle, void*, size_t) {
    return handle ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_NOT_INITIALIZED;
}

API cublasStatus_t cublasSetMathMode(void* handle, int) {
    return handle ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_NOT_INITIALIZED;
}

// C[i + j ldc] = alpha sum_p op(A)[i, p] op(B)[p, j] + beta C[i + j ldc]  (C is not read when beta is 0)
API cublasStatus_t cublasGemmStridedBatchedEx(void* handle, int transa, int transb, int m, int n, int k,
                                              const void* alpha, const void* A, int atype, int lda,
                                              long long stride_a, const void* B, int btype, int ldb,
                                              long long stride_b, const void* beta, void* C, int ctype, int ldc,
                                              long long stride_c, int batch, int compute, int /*algo*/) {
    if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (m < 0 || n < 0 || k < 0 || batch < 0) return CUBLAS_STATUS_INVALID_VALUE;
    if (transa == CUBLAS_OP_C || transb == CUBLAS_OP_C) return CUBLAS_STATUS_NOT_SUPPORTED;
    if (compute != CUBLAS_COMPUTE_32F && compute != CUBLAS_COMPUTE_32F_FAST_TF32) return CUBLAS_STATUS_NOT_SUPPORTED;
    for (int t : {atype, btype, ctype}) {
        if (t != CUDA_R_32F && t != CUDA_R_16BF) return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    // Leading dimensions as cuBLAS checks them.
    if (lda < (transa == CUBLAS_OP_N ? (m > 1 ? m : 1) : (k > 1 ? k : 1))) return CUBLAS_STATUS_INVALID_VALUE;
    if (ldb < (transb == CUBLAS_OP_N ? (k > 1 ? k : 1) : (n > 1 ? n : 1))) return CUBLAS_STATUS_INVALID_VALUE;
    if (ldc < (m > 1 ? m : 1)) return CUBLAS_STATUS_INVALID_VALUE;
    // MVAR_EMU_KERNELS=skip (driver.cpp's host-cost mode): checked, counted, not computed.
    ++g_gemm_calls;
    if (kernels_skipped()) return CUBLAS_STATUS_SUCCESS;
    const float al = *static_cast<const float*>(alpha);
    const float be = *static_cast<const float*>(beta);
    // op(A) packed as m rows of k and op(B) as n columns of k, so every output is a dot product
    // of two contiguous rows; columns of C are split among threads.
    std::vector<float> a_rows((size_t)m * k), b_cols((size_t)n * k);
    const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
    for (int b = 0; b < batch; ++b) {
        const int64_t oa = b * stride_a, ob = b * stride_b, oc = b * stride_c;
        for (int i = 0; i < m; ++i) {
            for (int p = 0; p < k; ++p) {
                int64_t ia = transa == CUBLAS_OP_N ? (int64_t)i + (int64_t)p * lda : (int64_t)p + (int64_t)i * lda;
                a_rows[(size_t)i * k + p] = load(A, atype, oa + ia);
            }
        }
        for (int j = 0; j < n; ++j) {
            for (int p = 0; p < k; ++p) {
                int64_t ib = transb == CUBLAS_OP_N ? (int64_t)p + (int64_t)j * ldb : (int64_t)j + (int64_t)p * ldb;
                b_cols[(size_t)j * k + p] = load(B, btype, ob + ib);
            }
        }
        auto columns = [&](int j0, int j1) {
            for (int j = j0; j < j1; ++j) {
                const float* bc = &b_cols[(size_t)j * k];
                for (int i = 0; i < m; ++i) {
                    const float* ar = &a_rows[(size_t)i * k];
                    float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                    int p = 0;
                    for (; p + 8 <= k; p += 8) {
                        for (int u = 0; u < 8; ++u) part[u] += ar[p + u] * bc[p + u];
                    }
                    float acc = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
                    for (; p < k; ++p) acc += ar[p] * bc[p];
                    int64_t ic = oc + (int64_t)i + (int64_t)j * ldc;
                    float v = al * acc;
                    if (be != 0.0f) v += be * load(C, ctype, ic);
                    store(C, ctype, ic, v);
                }
            }
        };
        const long long work = (long long)m * n * k;
        const int parts = work < (1 << 18) ? 1 : (int)std::min<unsigned>(hw, (unsigned)n);
        if (parts <= 1) {
            columns(0, n);
        } else {
            std::vector<std::thread> threads;
            for (int t = 0; t < parts; ++t) {
                threads.emplace_back(columns, (int)((long long)n * t / parts), (int)((long long)n * (t + 1) / parts));
            }
            for (auto& th : threads) th.join();
        }
    }
    return CUBLAS_STATUS_SUCCESS;
}

API const char* cublasGetStatusString(cublasStatus_t s) {
    switch (s) {
        case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
        case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
        case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
        case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
        default: return "CUBLAS_STATUS (mvar emulator)";
    }
}
