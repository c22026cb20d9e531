// device.h: the device side of mvar's CUDA emulator. Put in front of a kernel file, it lets g++
// compile `cuda/kernels/*.cu` as ordinary C++ and run each kernel on the CPU with the semantics
// the kernels rely on, so that the whole GPU path (Rust launch code, kernels, cuBLAS calls) can be
// tested on a machine without a GPU. It checks what a kernel computes, not how fast.
//
// Execution model:
// - One launch runs its blocks one after another. Each thread of a block is a fiber (its own
//   stack; an assembly stack switch on x86-64, which costs no system call, ucontext elsewhere) on
//   the launching OS thread; a fiber runs until it reaches a barrier (`__syncthreads`, or a warp
//   collective), then the next one runs. So between two barriers thread 0 runs first and the last
//   thread last: a value read from shared memory that another thread writes without a barrier in
//   between is, for most thread pairs, read before it is written, and the result is wrong.
// - `__shared__` variables become function-level thread_local statics: one copy per OS thread,
//   shared by the fibers of the block it runs; a launch runs on one OS thread and its blocks do
//   not overlap, so that is exactly per-block shared memory, and launches from several host
//   threads run side by side. Dynamic shared memory (`extern __shared__`) is one buffer per launch,
//   filled with 0xff bytes (NaN as floats) so that reading it before writing it shows.
// - Warps are groups of 32 consecutive linear thread ids. Shuffles, `ldmatrix` and `mma.sync` go
//   through a per-warp exchange area between two warp barriers, with the register fragment layouts
//   of the PTX ISA (m16n8k16 bf16, ldmatrix .x4 with and without .trans). A shuffle that reads a
//   lane which did not take part (exited, or missing in a partial warp) gets 0xff bytes, and an
//   ldmatrix or mma.sync in a warp that is not whole stops with a report: both are undefined on
//   the GPU.
// - A thread that returns leaves the block and warp barriers, as an exited thread does on the GPU.
//
// The driver (driver.cpp) finds the kernels by name through `mvar_emu_find` and runs them with
// `mvar_emu_launch`; the kernel list is generated at compile time (see compile.h).
#pragma once

#include <sys/mman.h>
#include <ucontext.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#ifdef MVAR_EMU_SCAN
// The scan pass records each kernel's bound (compile.h registers it with the kernel).
#define __launch_bounds__(...) mvar_emu_bounds(__VA_ARGS__)
#else
#define __launch_bounds__(...)
#endif
#define __align__(n) __attribute__((aligned(n)))  // as CUDA defines it: allowed among the decl-specifiers
#define __shared__ static thread_local
#ifdef MVAR_EMU_SCAN
// The scan pass (g++ -E) finds the kernels by this mark.
#define __global__ mvar_emu_kernel_mark
#else
#define __global__
#endif

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

namespace mvar_emu {

// A barrier of cooperating fibers: `expected` participants, of which `arrived` wait in `phase`.
struct Barrier {
    int expected = 0;
    int arrived = 0;
    unsigned phase = 0;
};

struct Warp {
    Barrier bar;
    int lanes = 32;
    uint64_t slot[32][8];
    // For shuffles: 1 + the warp barrier's phase at which each lane last published its slot, so
    // a lane that did not take part in a shuffle (it exited, or does not exist in a partial warp)
    // is told from one that did. Cleared with the barrier at the start of every block.
    unsigned published[32];
};

// The saved state of a suspended fiber: its stack pointer (x86-64) or its ucontext.
struct Context {
#if defined(__x86_64__)
    void* sp = nullptr;
#else
    ucontext_t uc;
#endif
};

// One 16-byte cp.async that has not landed yet (deferred mode).
struct AsyncCopy {
    void* dst;
    const void* src;  // null: write zeros (the source-size-0 form)
};

struct Fiber {
    Context ctx;
    bool done = false;
    std::vector<AsyncCopy> uncommitted;             // issued since the last commit
    std::vector<std::vector<AsyncCopy>> in_flight;  // committed groups, oldest first
};

// How adversarial a launch is (read from the environment once per process):
// - MVAR_EMU_SCHEDULE=reverse runs the fibers in descending order (the last thread first, and
//   round robin downwards), so a read of shared memory that a *lower* thread writes without a
//   barrier in between shows too (the forward order only exposes writes by higher threads), and
//   the blocks of a launch last to first (a block that reads what another block of the same
//   launch writes, which no GPU orders, sees it in one of the two orders only);
// - MVAR_EMU_CP_ASYNC=deferred lands each cp.async only when a cp.async.wait_group of its thread
//   forces it (the latest legal moment), so a read before the matching wait, or a missing wait
//   before a barrier, reads stale shared memory. The default `eager` lands a copy when it is
//   issued, which instead exposes a copy issued into a buffer other threads still read.
struct Modes {
    bool reverse = false;
    bool deferred_copies = false;
};
inline const Modes& modes() {
    static const Modes m = [] {
        Modes r;
        auto is = [](const char* var, const char* value) {
            const char* v = std::getenv(var);
            return v && std::strcmp(v, value) == 0;
        };
        r.reverse = is("MVAR_EMU_SCHEDULE", "reverse");
        r.deferred_copies = is("MVAR_EMU_CP_ASYNC", "deferred");
        return r;
    }();
    return m;
}

struct Launch {
    dim3 grid, block;
    unsigned char* dyn_smem = nullptr;
    size_t dyn_smem_bytes = 0;
    size_t max_dynamic_attr = 0;   // the function's MAX_DYNAMIC_SHARED_SIZE_BYTES
    size_t static_smem_bytes = 0;  // static arrays this block has reached so far
    Barrier block_bar;
    std::vector<Warp> warps;
    std::vector<Fiber> fibers;
    Context main;
    int current = 0;
    long long idle_switches = 0;  // switches since a barrier opened or a thread ended
    std::vector<void*> poisoned;   // static shared arrays already filled in this block
};

inline thread_local Launch* g_launch = nullptr;
inline thread_local int t_linear = 0;

inline Warp& warp() { return g_launch->warps[t_linear >> 5]; }
inline int lane() { return t_linear & 31; }

void switch_to_next();
void arrive_and_wait(Barrier& b);

}  // namespace mvar_emu

// The running fiber's indices (set on every switch).
inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) uint4 {
    unsigned int x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned int x, y;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }

// ------------------------------------------------------------------------------------------------
// intrinsics

inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline float __uint_as_float(unsigned int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline int __float_as_int(float f) {
    int i;
    std::memcpy(&i, &f, 4);
    return i;
}
inline unsigned int __float_as_uint(float f) {
    unsigned int i;
    std::memcpy(&i, &f, 4);
    return i;
}
// The _rn intrinsics round each operation on its own: the GPU never fuses them into an FMA. Their
// results pass through a volatile, which g++ cannot fuse across when kernels are built with FMA
// contraction (MVAR_EMU_FMA=1, as NVRTC contracts by default).
namespace mvar_emu {
inline float rounded(float v) {
    volatile float r = v;
    return r;
}
}  // namespace mvar_emu
inline float __fmul_rn(float a, float b) { return mvar_emu::rounded(a * b); }
inline float __fadd_rn(float a, float b) { return mvar_emu::rounded(a + b); }
inline float __fsub_rn(float a, float b) { return mvar_emu::rounded(a - b); }
inline float __fdiv_rn(float a, float b) { return mvar_emu::rounded(a / b); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __expf(float a) { return std::exp(a); }
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
inline unsigned int __umulhi(unsigned int a, unsigned int b) {
    return (unsigned int)(((unsigned long long)a * b) >> 32);
}

// CUDA's integer and float min/max overloads.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }

inline void __syncthreads() { mvar_emu::arrive_and_wait(mvar_emu::g_launch->block_bar); }
inline void __syncwarp(unsigned = 0xffffffffu) { mvar_emu::arrive_and_wait(mvar_emu::warp().bar); }

namespace mvar_emu {
// Every lane publishes `v`, then reads the value of lane `source(lane)`. A source lane that did
// not take part in this shuffle (it has exited, or does not exist in a partial warp) gives 0xff
// bytes (NaN as a float, -1 as an integer): the PTX ISA leaves that value undefined, and the GPU
// returns whatever that lane's register holds, so a kernel that uses it is wrong there even when
// an emulator returning the caller's own value, or a stale one, would pass.
template <typename T, typename Source>
inline T shuffle(T v, Source source) {
    static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
    auto& w = warp();
    int l = lane();
    const unsigned round = w.bar.phase + 1;
    std::memcpy(&w.slot[l][0], &v, sizeof(T));
    w.published[l] = round;
    arrive_and_wait(w.bar);
    int src = source(l);
    T r;
    if (src >= 0 && src < w.lanes && w.published[src] == round) {
        std::memcpy(&r, &w.slot[src][0], sizeof(T));
    } else {
        std::memset(&r, 0xff, sizeof(T));
    }
    arrive_and_wait(w.bar);
    return r;
}

// ldmatrix and mma.sync are .aligned: every lane of the warp must execute the same instruction,
// so one in a warp with exited or missing lanes is undefined on the GPU (it may hang or read
// garbage); here it stops with a report.
inline void require_whole_warp(const char* what) {
    const Warp& w = warp();
    if (w.lanes == 32 && w.bar.expected == 32) return;
    fprintf(stderr,
            "mvar CUDA emulator: %s in warp %d of block (%u, %u, %u) with %d of its 32 lanes live: every lane must "
            "execute it (.aligned); the GPU's result is undefined\n",
            what, t_linear >> 5, blockIdx.x, blockIdx.y, blockIdx.z, w.bar.expected);
    abort();
}
}  // namespace mvar_emu

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask, int width = 32) {
    return mvar_emu::shuffle(v, [&](int l) { return (l & ~(width - 1)) | ((l ^ lane_mask) & (width - 1)); });
}

template <typename T>
inline T __shfl_sync(unsigned, T v, int src_lane, int width = 32) {
    return mvar_emu::shuffle(v, [&](int l) { return (l & ~(width - 1)) | (src_lane & (width - 1)); });
}

namespace mvar_emu {
// Every lane publishes its predicate; each gets the bits of the lanes that published in this
// round (a lane that exited, or is missing from a partial warp, adds no bit, as on the GPU where
// only the active lanes vote).
inline unsigned ballot(bool pred) {
    auto& w = warp();
    int l = lane();
    const unsigned round = w.bar.phase + 1;
    w.slot[l][0] = pred ? 1u : 0u;
    w.published[l] = round;
    arrive_and_wait(w.bar);
    unsigned bits = 0;
    for (int i = 0; i < w.lanes; ++i)
        if (w.published[i] == round && w.slot[i][0]) bits |= 1u << i;
    arrive_and_wait(w.bar);
    return bits;
}
}  // namespace mvar_emu

inline unsigned __ballot_sync(unsigned, int pred) { return mvar_emu::ballot(pred != 0); }
inline int __any_sync(unsigned, int pred) { return mvar_emu::ballot(pred != 0) != 0; }
inline int __all_sync(unsigned, int pred) {
    // All of the live lanes: ballot of the negation is empty.
    return mvar_emu::ballot(pred == 0) == 0;
}

inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline double atomicAdd(double* p, double v) { return std::atomic_ref<double>(*p).fetch_add(v); }
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) {
    return std::atomic_ref<unsigned int>(*p).fetch_add(v);
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return std::atomic_ref<unsigned long long>(*p).fetch_add(v);
}

// Shared-window addresses are offsets into the launch's dynamic shared memory (the only shared
// memory the kernels address this way).
inline size_t __cvta_generic_to_shared(const void* p) {
    return (size_t)((const unsigned char*)p - mvar_emu::g_launch->dyn_smem);
}

namespace mvar_emu {
// What the hardware faults on ("misaligned address", "out of range shared or local address")
// but plain C++ on x86 would not: a 16-byte access `what` at `addr` (an offset into the dynamic
// shared memory when `shared`, else a global pointer) must be 16-byte aligned, and a shared one
// must lie inside the launch's dynamic shared memory.
inline void check_access16(const char* what, uintptr_t addr, bool shared) {
    const char* fault = nullptr;
    if (addr & 15) {
        fault = "is not 16-byte aligned";
    } else if (shared && addr + 16 > g_launch->dyn_smem_bytes) {
        fault = "lies outside the dynamic shared memory";
    }
    if (!fault) return;
    fprintf(stderr,
            "mvar CUDA emulator: %s: the %s address 0x%llx %s (%zu bytes of dynamic shared memory), thread %d "
            "of block (%u, %u, %u); the GPU faults here\n",
            what, shared ? "shared" : "global", (unsigned long long)addr, fault, g_launch->dyn_smem_bytes,
            t_linear, blockIdx.x, blockIdx.y, blockIdx.z);
    abort();
}
}  // namespace mvar_emu

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8i..8i+7 give the row addresses of
// matrix i; without .trans lane l gets row l/4, columns 2(l%4) and 2(l%4)+1 of each matrix, with
// .trans it gets column l/4 of rows 2(l%4) and 2(l%4)+1 (the first element in the low half).
inline void mvar_emu_ldmatrix_x4(unsigned (&r)[4], unsigned addr, bool trans) {
    auto& w = mvar_emu::warp();
    int lane = mvar_emu::lane();
    // Each row is 16 bytes, read as one access.
    mvar_emu::check_access16(trans ? "ldmatrix.trans" : "ldmatrix", addr, true);
    w.slot[lane][0] = addr;
    mvar_emu::arrive_and_wait(w.bar);
    // Checked once every live lane has arrived: a lane that exits does so before the barrier opens.
    mvar_emu::require_whole_warp(trans ? "ldmatrix.trans" : "ldmatrix");
    const unsigned char* base = mvar_emu::g_launch->dyn_smem;
    for (int i = 0; i < 4; ++i) {
        uint16_t lo, hi;
        if (!trans) {
            const uint16_t* row = (const uint16_t*)(base + w.slot[i * 8 + lane / 4][0]);
            lo = row[2 * (lane % 4)];
            hi = row[2 * (lane % 4) + 1];
        } else {
            const uint16_t* r0 = (const uint16_t*)(base + w.slot[i * 8 + 2 * (lane % 4)][0]);
            const uint16_t* r1 = (const uint16_t*)(base + w.slot[i * 8 + 2 * (lane % 4) + 1][0]);
            lo = r0[lane / 4];
            hi = r1[lane / 4];
        }
        r[i] = (unsigned)lo | ((unsigned)hi << 16);
    }
    mvar_emu::arrive_and_wait(w.bar);
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, c += a * b. With g = lane/4, t = lane%4:
// a[0] holds A[g][2t..2t+1], a[1] A[g+8][2t..], a[2] A[g][2t+8..], a[3] A[g+8][2t+8..];
// b0 holds B[2t..2t+1][g], b1 B[2t+8..2t+9][g]; c[0..1] is C[g][2t..2t+1], c[2..3] C[g+8][2t..].
inline void mvar_emu_mma_m16n8k16_bf16(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    auto& w = mvar_emu::warp();
    int lane = mvar_emu::lane();
    for (int i = 0; i < 4; ++i) w.slot[lane][i] = a[i];
    w.slot[lane][4] = b0;
    w.slot[lane][5] = b1;
    mvar_emu::arrive_and_wait(w.bar);
    mvar_emu::require_whole_warp("mma.sync");
    auto half = [&](int l, int reg, int k) {
        unsigned bits = (unsigned)w.slot[l][reg];
        unsigned h = (k & 1) ? (bits >> 16) : (bits & 0xffffu);
        return __uint_as_float(h << 16);
    };
    int g = lane / 4, t = lane % 4;
    for (int ri = 0; ri < 2; ++ri) {
        for (int ci = 0; ci < 2; ++ci) {
            int row = g + 8 * ri, col = 2 * t + ci;
            float acc = c[2 * ri + ci];
            for (int k = 0; k < 16; ++k) {
                float av = half((row % 8) * 4 + (k % 8) / 2, (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0), k);
                float bv = half(col * 4 + (k % 8) / 2, 4 + (k >= 8 ? 1 : 0), k);
                acc += av * bv;
            }
            c[2 * ri + ci] = acc;
        }
    }
    mvar_emu::arrive_and_wait(w.bar);
}

// cp.async.cg.shared.global 16 bytes (src null: 16 zero bytes), commit_group and wait_group N.
// Eager mode lands the copy at issue; deferred mode keeps it with its thread until a
// wait_group N is issued while its group is not among the N youngest in flight (see Modes).
namespace mvar_emu {
inline void land(const AsyncCopy& c) {
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (c.src) std::memcpy(&v, c.src, 16);
    std::memcpy(c.dst, &v, 16);
}
inline Fiber& self() { return g_launch->fibers[g_launch->current]; }
}  // namespace mvar_emu

inline void mvar_emu_cp_async16(void* smem, const void* gmem) {
    mvar_emu::check_access16("cp.async (shared destination)", __cvta_generic_to_shared(smem), true);
    if (gmem) mvar_emu::check_access16("cp.async (global source)", (uintptr_t)gmem, false);
    const mvar_emu::AsyncCopy c{smem, gmem};
    if (!mvar_emu::modes().deferred_copies) {
        mvar_emu::land(c);
        return;
    }
    mvar_emu::self().uncommitted.push_back(c);
}

inline void mvar_emu_cp_commit() {
    auto& f = mvar_emu::self();
    if (!mvar_emu::modes().deferred_copies) return;
    f.in_flight.push_back(std::move(f.uncommitted));
    f.uncommitted.clear();
}

inline void mvar_emu_cp_wait(int groups_left) {
    auto& f = mvar_emu::self();
    while ((int)f.in_flight.size() > groups_left) {
        for (const auto& c : f.in_flight.front()) mvar_emu::land(c);
        f.in_flight.erase(f.in_flight.begin());
    }
}

// The first thread of a block to pass a static `__shared__` declaration fills the array with 0xff
// bytes (the call is inserted after each declaration by compile.h's poison_static_shared).
// It also adds the array to the block's static shared memory and checks the total against what
// a GPU allows next to the launch's dynamic shared memory: 48 KiB for both unless the function
// opted in to more dynamic memory, and then static plus that opted-in maximum at most 227 KiB.
namespace mvar_emu {
constexpr size_t kSharedPerBlock = 48 * 1024;
constexpr size_t kSharedPerBlockOptin = 232448;  // H100: 227 KiB

inline thread_local size_t t_max_dynamic_attr = kSharedPerBlock;

inline void check_shared_total(const Launch& l) {
    const bool opted_in = l.max_dynamic_attr > kSharedPerBlock;
    const size_t used = l.static_smem_bytes + (opted_in ? l.max_dynamic_attr : l.dyn_smem_bytes);
    const size_t limit = opted_in ? kSharedPerBlockOptin : kSharedPerBlock;
    if (used <= limit) return;
    fprintf(stderr,
            "mvar CUDA emulator: block (%u, %u, %u) uses %zu bytes of static shared memory next to %zu bytes of %s "
            "dynamic shared memory: %zu bytes, more than the %zu a GPU block may have; the launch fails there\n",
            blockIdx.x, blockIdx.y, blockIdx.z, l.static_smem_bytes, opted_in ? l.max_dynamic_attr : l.dyn_smem_bytes,
            opted_in ? "opted-in maximum" : "", used, limit);
    abort();
}

inline void poison_shared(void* p, size_t bytes) {
    auto& seen = g_launch->poisoned;
    for (void* q : seen) {
        if (q == p) return;
    }
    seen.push_back(p);
    std::memset(p, 0xff, bytes);
    g_launch->static_smem_bytes += bytes;
    check_shared_total(*g_launch);
}
}  // namespace mvar_emu

// The driver passes a function's MAX_DYNAMIC_SHARED_SIZE_BYTES before each launch.
extern "C" __attribute__((visibility("default"))) void mvar_emu_set_max_dynamic_shared(size_t bytes) {
    mvar_emu::t_max_dynamic_attr = bytes;
}

// ------------------------------------------------------------------------------------------------
// kernel registry and launcher

namespace mvar_emu {

using Thunk = void (*)(void* fn, void** params);

struct Entry {
    void* fn;
    Thunk thunk;
    unsigned max_threads;  // the first argument of its __launch_bounds__, 0 without
};

// Blocks of more threads than this need a kernel that declares __launch_bounds__: without one
// ptxas may give a thread up to 255 registers, and 256 such threads fill an SM's 65536.
constexpr unsigned kThreadsWithoutBounds = 256;

inline std::map<std::string, Entry>& registry() {
    static std::map<std::string, Entry> m;
    return m;
}

template <typename... A, size_t... I>
void call(void (*f)(A...), void** p, std::index_sequence<I...>) {
    f(*static_cast<std::remove_cv_t<A>*>(p[I])...);
}

template <typename... A>
void thunk(void* fn, void** p) {
    call(reinterpret_cast<void (*)(A...)>(fn), p, std::index_sequence_for<A...>{});
}

struct Registrar {
    template <typename... A>
    Registrar(const char* name, void (*f)(A...), unsigned max_threads = 0) {
        registry()[name] = Entry{reinterpret_cast<void*>(f), &thunk<A...>, max_threads};
    }
};

constexpr size_t kStackBytes = 512 * 1024;

#if defined(__x86_64__)
// Saves the callee-saved registers and the SSE/x87 control words on the current stack, stores
// the stack pointer in *save, and resumes the fiber whose stack pointer is `load`.
extern "C" void mvar_emu_switch(void** save, void* load);
asm(R"(
    .text
    .p2align 4
    .globl mvar_emu_switch
    .hidden mvar_emu_switch
    .type mvar_emu_switch, @function
mvar_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size mvar_emu_switch, .-mvar_emu_switch
)");

inline void switch_context(Context& save, Context& load) { mvar_emu_switch(&save.sp, load.sp); }

// A fresh fiber on `stack` that starts in `entry` (which never returns): the frame
// mvar_emu_switch pops, with `entry` as the return address at a call-aligned position.
inline void make_context(Context& c, void* stack, size_t bytes, void (*entry)()) {
    uintptr_t top = ((uintptr_t)stack + bytes) & ~(uintptr_t)15;
    void** sp = (void**)(top - 16);
    sp[0] = (void*)entry;
    sp -= 7;  // control words, r15, r14, r13, r12, rbx, rbp
    for (int i = 1; i < 7; ++i) sp[i] = nullptr;
    uint32_t words[2];
    asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(words[0]), "=m"(words[1]));
    std::memcpy(&sp[0], words, 8);
    c.sp = sp;
}
#else
inline void switch_context(Context& save, Context& load) { swapcontext(&save.uc, &load.uc); }

inline void make_context(Context& c, void* stack, size_t bytes, void (*entry)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = bytes;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
}
#endif

// Sets of fiber stacks, kept between launches (untouched pages cost nothing); a launch borrows
// one set.
struct StackPool {
    std::mutex lock;
    std::vector<std::vector<void*>> free_sets;
};
inline StackPool& stack_pool() {
    static StackPool p;
    return p;
}

inline void set_current(int t) {
    Launch& l = *g_launch;
    l.current = t;
    t_linear = t;
    const dim3 b = l.block;
    threadIdx = dim3{(unsigned)(t % b.x), (unsigned)((t / b.x) % b.y), (unsigned)(t / (b.x * b.y))};
}

// Runs the next fiber that has not finished, round robin; back to the launcher when none is left.
inline void switch_to_next() {
    Launch& l = *g_launch;
    const int n = (int)l.fibers.size();
    const int from = l.current;
    const int step = modes().reverse ? n - 1 : 1;
    for (int i = 1; i <= n; ++i) {
        int t = (int)((from + (long long)i * step) % n);
        if (!l.fibers[t].done) {
            if (t == from) return;
            set_current(t);
            switch_context(l.fibers[from].ctx, l.fibers[t].ctx);
            return;
        }
    }
    switch_context(l.fibers[from].ctx, l.main);
}

inline void open(Barrier& b) {
    b.arrived = 0;
    ++b.phase;
    g_launch->idle_switches = 0;
}

inline void arrive_and_wait(Barrier& b) {
    const unsigned my_phase = b.phase;
    if (++b.arrived == b.expected) {
        open(b);
        return;
    }
    while (b.phase == my_phase) {
        // Every live fiber waits at some barrier and none can open: the GPU would hang here.
        if (++g_launch->idle_switches > 4 * (long long)g_launch->fibers.size() + 64) {
            fprintf(stderr,
                    "mvar CUDA emulator: deadlock in block (%u, %u, %u): the threads wait at barriers that cannot "
                    "complete (a __syncthreads or warp collective not reached by every live thread)\n",
                    blockIdx.x, blockIdx.y, blockIdx.z);
            abort();
        }
        switch_to_next();
    }
}

// A thread that returns no longer counts at the barriers (as an exited thread on the GPU).
inline void leave(Barrier& b) {
    --b.expected;
    if (b.arrived > 0 && b.arrived == b.expected) open(b);
}

struct FiberArgs {
    Entry entry;
    void** params;
};
inline thread_local FiberArgs g_fiber_args;

inline void fiber_main() {
    Launch& l = *g_launch;
    g_fiber_args.entry.thunk(g_fiber_args.entry.fn, g_fiber_args.params);
    const int t = l.current;
    Fiber& self = l.fibers[t];
    size_t pending = self.uncommitted.size();
    for (const auto& group : self.in_flight) pending += group.size();
    if (pending > 0) {
        // Shared memory is released when the block ends; a copy still landing in it is a bug.
        fprintf(stderr,
                "mvar CUDA emulator: thread %d of block (%u, %u, %u) exited with %zu cp.async copies in flight; "
                "wait for them before returning\n",
                t, blockIdx.x, blockIdx.y, blockIdx.z, pending);
        abort();
    }
    self.in_flight.clear();
    leave(l.block_bar);
    leave(l.warps[t >> 5].bar);
    l.fibers[t].done = true;
    l.idle_switches = 0;
    switch_to_next();  // never returns: a finished fiber is not resumed
}

}  // namespace mvar_emu

extern "C" __attribute__((visibility("default"))) int mvar_emu_find(const char* name) {
    return mvar_emu::registry().count(name) ? 1 : 0;
}

// Runs kernel `name` to completion. Returns 0, 1 when there is no such kernel, 2 when the fiber
// stacks cannot be had, 3 when the block has more threads than the kernel may be launched with.
extern "C" __attribute__((visibility("default"))) int mvar_emu_launch(const char* name, unsigned gx, unsigned gy,
                                                                       unsigned gz, unsigned bx, unsigned by,
                                                                       unsigned bz, size_t smem, void** params) {
    using namespace mvar_emu;
    auto it = registry().find(name);
    if (it == registry().end()) return 1;
    const int nthreads = (int)(bx * by * bz);
    // The GPU refuses a launch past the kernel's __launch_bounds__ (too many resources
    // requested); past kThreadsWithoutBounds without bounds it refuses one when ptxas happened to
    // use many registers, so that is refused here whatever the count.
    const unsigned bound = it->second.max_threads;
    if ((bound > 0 && (unsigned)nthreads > bound) || (bound == 0 && (unsigned)nthreads > kThreadsWithoutBounds)) {
        if (bound > 0) {
            fprintf(stderr,
                    "mvar CUDA emulator: %s launched with %d threads per block, more than its "
                    "__launch_bounds__(%u): the GPU refuses this launch\n",
                    name, nthreads, bound);
        } else {
            fprintf(stderr,
                    "mvar CUDA emulator: %s launched with %d threads per block but declares no __launch_bounds__: "
                    "past %u threads that launch fails on the GPU whenever ptxas gives the kernel more than "
                    "65536 / %d registers per thread; declare __launch_bounds__(%d)\n",
                    name, nthreads, kThreadsWithoutBounds, nthreads, nthreads);
        }
        return 3;
    }
    std::vector<void*> st;
    {
        std::lock_guard<std::mutex> g(stack_pool().lock);
        if (!stack_pool().free_sets.empty()) {
            st = std::move(stack_pool().free_sets.back());
            stack_pool().free_sets.pop_back();
        }
    }
    while ((int)st.size() < nthreads) {
        void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) return 2;
        st.push_back(p);
    }
    Launch launch;
    launch.grid = dim3{gx, gy, gz};
    launch.block = dim3{bx, by, bz};
    std::vector<unsigned char> dyn(smem + 16, 0xff);
    launch.dyn_smem = dyn.data() + ((16 - ((uintptr_t)dyn.data() & 15)) & 15);
    launch.dyn_smem_bytes = smem;
    launch.max_dynamic_attr = t_max_dynamic_attr;
    launch.warps = std::vector<Warp>((nthreads + 31) / 32);
    launch.fibers = std::vector<Fiber>(nthreads);
    g_launch = &launch;
    g_fiber_args = FiberArgs{it->second, params};
    blockDim = launch.block;
    gridDim = launch.grid;
    const long long nblocks = (long long)gx * gy * gz;
    for (long long i = 0; i < nblocks; ++i) {
        const long long b = modes().reverse ? nblocks - 1 - i : i;
        blockIdx = dim3{(unsigned)(b % gx), (unsigned)((b / gx) % gy), (unsigned)(b / ((long long)gx * gy))};
        launch.block_bar = Barrier{nthreads, 0, 0};
        launch.poisoned.clear();
        launch.static_smem_bytes = 0;
        // Each block starts from garbage (NaN), not from what the previous block left, so a read
        // before a write shows in every block, as the static arrays' fill does.
        std::memset(launch.dyn_smem, 0xff, smem);
        for (size_t w = 0; w < launch.warps.size(); ++w) {
            int lanes = std::min(32, nthreads - (int)w * 32);
            launch.warps[w].lanes = lanes;
            launch.warps[w].bar = Barrier{lanes, 0, 0};
            std::memset(launch.warps[w].published, 0, sizeof(launch.warps[w].published));
        }
        for (int t = 0; t < nthreads; ++t) {
            Fiber& f = launch.fibers[t];
            f.done = false;
            make_context(f.ctx, st[t], kStackBytes, fiber_main);
        }
        launch.idle_switches = 0;
        const int first = modes().reverse ? nthreads - 1 : 0;
        set_current(first);
        switch_context(launch.main, launch.fibers[first].ctx);
    }
    g_launch = nullptr;
    std::lock_guard<std::mutex> g(stack_pool().lock);
    stack_pool().free_sets.push_back(std::move(st));
    return 0;
}
