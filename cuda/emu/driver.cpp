// driver.cpp: libcuda.so.1 of mvar's CUDA emulator: the CUDA driver API entry points that cudarc
// calls for mvar, implemented on the CPU.
//
// - One device, "mvar CUDA emulator (CPU)", reporting compute capability 9.0 and the H100's launch
//   limits (1024 threads per block, 48 KiB of shared memory per block unless a kernel opts in to up
//   to 227 KiB), so launch configurations the GPU would refuse are refused here too.
// - Device memory is host memory. Its size is $MVAR_EMU_MEMORY_MB (default 16384); an allocation
//   beyond what is free fails with CUDA_ERROR_OUT_OF_MEMORY, as on the GPU. Each allocation ends
//   (rounded up to 256 bytes) at an inaccessible guard page, so a kernel that reads or writes
//   past the end of a buffer stops at once with the kernel's name instead of passing by luck.
// - Every call runs to completion before it returns (streams and events are orderings that hold
//   trivially); launches from several host threads run side by side (device.h keeps all launch
//   state per OS thread).
// - A module image is the kernel source behind compile.h's magic (what the emulated NVRTC
//   returns); it is built with g++ and dlopen'ed.
// - MVAR_EMU_KERNELS=skip (host-cost mode): launches are checked as always but no kernel runs, and
//   fresh device memory is zeroed instead of NaN-filled, so a program runs its whole host side
//   (the engine's dispatch, tape, allocator and launch code) on data that stays finite and
//   meaningless. Its wall time is then what the host spends per step, less the real driver's own
//   cost per launch; at exit the emulator prints how many launches, synchronisations and copies
//   there were (MVAR_EMU_STATS=1 prints the same line in the normal mode).
#include <dlfcn.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>

#include "compile.h"
#include "host_cost.h"

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef void* CUcontext;
typedef void* CUstream;

enum : int {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES = 701,
    CUDA_ERROR_LAUNCH_FAILED = 719,
    CUDA_ERROR_NOT_SUPPORTED = 801,
};

#define API extern "C" __attribute__((visibility("default")))

namespace {

constexpr int kDefaultSharedPerBlock = 48 * 1024;
constexpr int kMaxSharedPerBlockOptin = 232448;  // H100: 227 KiB

struct Module {
    void* handle;
    int (*find)(const char*);
    int (*launch)(const char*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, size_t, void**);
    void (*set_max_dynamic_shared)(size_t);  // what device.h checks static shared memory against
};

struct Function {
    Module* module;
    std::string name;
    int max_dynamic_shared = kDefaultSharedPerBlock;
};

struct Event {
    std::chrono::steady_clock::time_point at;
};

using mvar_emu_host_cost::kernels_skipped;

// What the program asked of the device, printed at exit in the host-cost mode or with
// MVAR_EMU_STATS=1.
std::atomic<unsigned long long> g_launches{0}, g_syncs{0}, g_to_host{0}, g_to_device{0}, g_allocs{0}, g_frees{0},
    g_alloc_bytes{0};

struct StatsAtExit {
    ~StatsAtExit() {
        if (!mvar_emu_host_cost::stats_wanted()) return;
        fprintf(stderr,
                "mvar CUDA emulator%s: %llu kernel launches, %llu synchronisations (stream, context, event), "
                "%llu copies to the host, %llu to the device, %llu allocations (%.1f GiB) and %llu frees of device memory\n",
                kernels_skipped() ? " (kernels skipped)" : "", g_launches.load(), g_syncs.load(), g_to_host.load(),
                g_to_device.load(), g_allocs.load(), g_alloc_bytes.load() / 1073741824.0, g_frees.load());
    }
} g_stats_at_exit;

std::mutex g_lock;  // the memory table
struct Mapping {
    size_t bytes;   // as asked
    void* base;     // of the mmap, guard page included
    size_t mapped;  // bytes mapped
};
std::map<CUdeviceptr, Mapping> g_allocations;
thread_local const char* t_running_kernel = nullptr;

void on_fault(int sig, siginfo_t* info, void*) {
    char msg[640];
    const char* what = sig == SIGSEGV ? "segmentation fault" : sig == SIGBUS ? "bus error" : "trap";
    // A trap in a kernel is a check of MVAR_EMU_SANITIZE's (compile.h) that failed.
    const char* why = sig == SIGILL ? "a misaligned access, an index past a fixed-size array, a bad shift or "
                                      "division, or another undefined operation (MVAR_EMU_SANITIZE)"
                                    : "just past the end, or with MVAR_EMU_GUARD=front before the start, of a device buffer: "
                                      "guard page";
    int n = snprintf(msg, sizeof msg, "mvar CUDA emulator: %s at address %p%s%s%s (%s)\n", what, info->si_addr,
                     t_running_kernel ? " in kernel " : "", t_running_kernel ? t_running_kernel : "",
                     t_running_kernel ? "" : " outside any kernel", why);
    if (n > 0) (void)!write(2, msg, (size_t)n < sizeof msg ? (size_t)n : sizeof msg - 1);
    signal(sig, SIG_DFL);
    raise(sig);
}

void install_fault_handler() {
    static std::once_flag once;
    std::call_once(once, [] {
        struct sigaction sa;
        std::memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_fault;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigaction(SIGSEGV, &sa, nullptr);
        sigaction(SIGBUS, &sa, nullptr);
        sigaction(SIGILL, &sa, nullptr);
    });
}
size_t g_used = 0;
int g_context_token = 0;
int g_stream_token = 0;

size_t total_memory() {
    const char* mb = getenv("MVAR_EMU_MEMORY_MB");
    size_t m = mb && *mb ? strtoull(mb, nullptr, 10) : 16384;
    return m << 20;
}

// MVAR_EMU_GUARD=front puts each allocation's guard page before it instead of after it.
bool guard_in_front() {
    static const bool front = [] {
        const char* g = getenv("MVAR_EMU_GUARD");
        return g && std::string(g) == "front";
    }();
    return front;
}

CUresult alloc(CUdeviceptr* p, size_t bytes) {
    if (!p) return CUDA_ERROR_INVALID_VALUE;
    if (bytes == 0) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lock(g_lock);
    if (bytes > total_memory() - g_used) return CUDA_ERROR_OUT_OF_MEMORY;
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    const size_t rounded = (bytes + 255) / 256 * 256;
    const size_t data_pages = (rounded + page - 1) / page * page;
    const size_t mapped = data_pages + page;
    void* base = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
    if (guard_in_front()) {
        // The buffer starts right after the guard page: a read or write before it faults.
        mprotect(base, page, PROT_NONE);
        *p = (CUdeviceptr)((unsigned char*)base + page);
    } else {
        // The buffer (rounded to 256 bytes, as cuMemAlloc aligns) ends at the guard page.
        unsigned char* guard = (unsigned char*)base + data_pages;
        mprotect(guard, page, PROT_NONE);
        *p = (CUdeviceptr)(guard - rounded);
    }
    // Fresh device memory holds garbage on a GPU (a reused block, what a previous process left):
    // NaN here, so a kernel that reads an output it never wrote, or counts on zeroed memory that
    // nobody cleared, fails instead of seeing the zeros of a fresh mapping. With the kernels
    // skipped nothing is computed, and the zeros of the fresh mapping keep the host's checks (a
    // NaN loss) quiet; not touching the pages keeps the mapping's cost out of the host's time.
    if (!kernels_skipped()) std::memset((void*)*p, 0xff, rounded);
    ++g_allocs;
    g_alloc_bytes += bytes;
    g_allocations[*p] = Mapping{bytes, base, mapped};
    g_used += bytes;
    return CUDA_SUCCESS;
}

CUresult release(CUdeviceptr p) {
    std::lock_guard<std::mutex> lock(g_lock);
    auto it = g_allocations.find(p);
    if (it == g_allocations.end()) return CUDA_ERROR_INVALID_VALUE;
    g_used -= it->second.bytes;
    ++g_frees;
    munmap(it->second.base, it->second.mapped);
    g_allocations.erase(it);
    return CUDA_SUCCESS;
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// initialisation, devices, contexts

API CUresult cuInit(unsigned int) {
    install_fault_handler();
    return CUDA_SUCCESS;
}

API CUresult cuDriverGetVersion(int* v) {
    *v = 13000;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGetCount(int* n) {
    *n = 1;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
    *d = 0;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGetName(char* name, int len, CUdevice) {
    snprintf(name, (size_t)len, "%s", "mvar CUDA emulator (CPU)");
    return CUDA_SUCCESS;
}

API CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice) {
    *bytes = total_memory();
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGetAttribute(int* v, int attribute, CUdevice) {
    switch (attribute) {
        case 1: *v = 1024; break;              // max threads per block
        case 2: case 3: *v = 1024; break;      // max block dim x, y
        case 4: *v = 64; break;                // max block dim z
        case 5: *v = 2147483647; break;        // max grid dim x
        case 6: case 7: *v = 65535; break;     // max grid dim y, z
        case 8: *v = kDefaultSharedPerBlock; break;
        case 10: *v = 32; break;               // warp size
        case 12: *v = 65536; break;            // registers per block
        case 13: *v = 1000000; break;          // clock rate, kHz
        case 16: *v = 4; break;                // multiprocessors
        case 36: *v = 1000000; break;          // memory clock rate, kHz
        case 37: *v = 64; break;               // memory bus width
        case 38: *v = 4 << 20; break;          // L2 bytes
        case 75: *v = 9; break;                // compute capability
        case 76: *v = 0; break;
        case 81: *v = kMaxSharedPerBlockOptin + 1024; break;
        case 97: *v = kMaxSharedPerBlockOptin; break;
        case 115: *v = 0; break;               // no memory pools: cudarc uses cuMemAlloc
        default: *v = 0; break;
    }
    return CUDA_SUCCESS;
}

API CUresult cuDevicePrimaryCtxRetain(CUcontext* ctx, CUdevice) {
    *ctx = &g_context_token;
    return CUDA_SUCCESS;
}
API CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return CUDA_SUCCESS; }
API CUresult cuDevicePrimaryCtxReset_v2(CUdevice) { return CUDA_SUCCESS; }
API CUresult cuCtxSetCurrent(CUcontext) { return CUDA_SUCCESS; }
API CUresult cuCtxGetCurrent(CUcontext* ctx) {
    *ctx = &g_context_token;
    return CUDA_SUCCESS;
}
API CUresult cuCtxPushCurrent_v2(CUcontext) { return CUDA_SUCCESS; }
API CUresult cuCtxPopCurrent_v2(CUcontext* ctx) {
    if (ctx) *ctx = &g_context_token;
    return CUDA_SUCCESS;
}
API CUresult cuCtxGetDevice(CUdevice* d) {
    *d = 0;
    return CUDA_SUCCESS;
}
API CUresult cuCtxSynchronize() {
    ++g_syncs;
    return CUDA_SUCCESS;
}

// ------------------------------------------------------------------------------------------------
// streams and events

API CUresult cuStreamCreate(CUstream* s, unsigned int) {
    *s = &g_stream_token;
    return CUDA_SUCCESS;
}
API CUresult cuStreamCreateWithPriority(CUstream* s, unsigned int, int) {
    *s = &g_stream_token;
    return CUDA_SUCCESS;
}
API CUresult cuStreamDestroy_v2(CUstream) { return CUDA_SUCCESS; }
API CUresult cuStreamSynchronize(CUstream) {
    ++g_syncs;
    return CUDA_SUCCESS;
}
API CUresult cuStreamQuery(CUstream) { return CUDA_SUCCESS; }
API CUresult cuStreamWaitEvent(CUstream, void*, unsigned int) { return CUDA_SUCCESS; }

API CUresult cuEventCreate(void** e, unsigned int) {
    *e = new Event{std::chrono::steady_clock::now()};
    return CUDA_SUCCESS;
}
API CUresult cuEventDestroy_v2(void* e) {
    delete static_cast<Event*>(e);
    return CUDA_SUCCESS;
}
API CUresult cuEventRecord(void* e, CUstream) {
    if (!e) return CUDA_ERROR_INVALID_HANDLE;
    static_cast<Event*>(e)->at = std::chrono::steady_clock::now();
    return CUDA_SUCCESS;
}
API CUresult cuEventRecordWithFlags(void* e, CUstream s, unsigned int) { return cuEventRecord(e, s); }
API CUresult cuEventSynchronize(void*) {
    ++g_syncs;
    return CUDA_SUCCESS;
}
API CUresult cuEventQuery(void*) { return CUDA_SUCCESS; }
API CUresult cuEventElapsedTime(float* ms, void* start, void* end) {
    if (!start || !end) return CUDA_ERROR_INVALID_HANDLE;
    auto d = static_cast<Event*>(end)->at - static_cast<Event*>(start)->at;
    *ms = std::chrono::duration<float, std::milli>(d).count();
    return CUDA_SUCCESS;
}
API CUresult cuEventElapsedTime_v2(float* ms, void* start, void* end) { return cuEventElapsedTime(ms, start, end); }

// ------------------------------------------------------------------------------------------------
// memory

API CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) { return alloc(p, bytes); }
API CUresult cuMemFree_v2(CUdeviceptr p) { return release(p); }
API CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, CUstream) { return alloc(p, bytes); }
API CUresult cuMemFreeAsync(CUdeviceptr p, CUstream) { return release(p); }

API CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total_bytes) {
    std::lock_guard<std::mutex> lock(g_lock);
    *total_bytes = total_memory();
    *free_bytes = *total_bytes - g_used;
    return CUDA_SUCCESS;
}

API CUresult cuMemAllocHost_v2(void** p, size_t bytes) {
    *p = std::malloc(bytes ? bytes : 1);
    return *p ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}
API CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned int) { return cuMemAllocHost_v2(p, bytes); }
API CUresult cuMemFreeHost(void* p) {
    std::free(p);
    return CUDA_SUCCESS;
}

API CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    ++g_to_device;
    std::memcpy((void*)dst, src, n);
    return CUDA_SUCCESS;
}
API CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    ++g_to_host;
    std::memcpy(dst, (const void*)src, n);
    return CUDA_SUCCESS;
}
API CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    // Device work, which the host-cost mode leaves out like the kernels.
    if (kernels_skipped()) return CUDA_SUCCESS;
    std::memmove((void*)dst, (const void*)src, n);
    return CUDA_SUCCESS;
}
API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, CUstream) {
    return cuMemcpyHtoD_v2(dst, src, n);
}
API CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, CUstream) {
    return cuMemcpyDtoH_v2(dst, src, n);
}
API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream) {
    return cuMemcpyDtoD_v2(dst, src, n);
}
API CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) {
    if (kernels_skipped()) return CUDA_SUCCESS;
    std::memset((void*)dst, v, n);
    return CUDA_SUCCESS;
}
API CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, CUstream) { return cuMemsetD8_v2(dst, v, n); }
API CUresult cuMemsetD32_v2(CUdeviceptr dst, unsigned int v, size_t n) {
    if (kernels_skipped()) return CUDA_SUCCESS;
    unsigned int* p = (unsigned int*)dst;
    for (size_t i = 0; i < n; ++i) p[i] = v;
    return CUDA_SUCCESS;
}
API CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned int v, size_t n, CUstream) {
    return cuMemsetD32_v2(dst, v, n);
}

// ------------------------------------------------------------------------------------------------
// modules and launches

API CUresult cuModuleLoadData(void** module, const void* image) {
    const char* text = static_cast<const char*>(image);
    const std::string& magic = mvar_emu_build::kMagic;
    if (!text || std::strncmp(text, magic.c_str(), magic.size()) != 0) {
        fprintf(stderr, "mvar CUDA emulator: the module image is not an emulated one (compile it with the emulated NVRTC)\n");
        return CUDA_ERROR_INVALID_IMAGE;
    }
    std::string log;
    std::string so = mvar_emu_build::build_module(text + magic.size(), log);
    if (so.empty()) {
        fprintf(stderr, "mvar CUDA emulator: building the module failed:\n%s\n", log.c_str());
        return CUDA_ERROR_INVALID_IMAGE;
    }
    void* h = dlopen(so.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        fprintf(stderr, "mvar CUDA emulator: dlopen %s: %s\n", so.c_str(), dlerror());
        return CUDA_ERROR_INVALID_IMAGE;
    }
    auto* m = new Module{h, nullptr, nullptr};
    m->find = reinterpret_cast<int (*)(const char*)>(dlsym(h, "mvar_emu_find"));
    m->launch = reinterpret_cast<decltype(m->launch)>(dlsym(h, "mvar_emu_launch"));
    m->set_max_dynamic_shared =
        reinterpret_cast<decltype(m->set_max_dynamic_shared)>(dlsym(h, "mvar_emu_set_max_dynamic_shared"));
    if (!m->find || !m->launch) {
        delete m;
        return CUDA_ERROR_INVALID_IMAGE;
    }
    *module = m;
    return CUDA_SUCCESS;
}

API CUresult cuModuleLoadDataEx(void** module, const void* image, unsigned int, void*, void**) {
    return cuModuleLoadData(module, image);
}

API CUresult cuModuleUnload(void* module) {
    // Kept loaded: functions handed out earlier may still be launched by cached handles.
    return module ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

API CUresult cuModuleGetFunction(void** f, void* module, const char* name) {
    auto* m = static_cast<Module*>(module);
    if (!m) return CUDA_ERROR_INVALID_HANDLE;
    if (!m->find(name)) return CUDA_ERROR_NOT_FOUND;
    *f = new Function{m, name};
    return CUDA_SUCCESS;
}

API CUresult cuFuncSetAttribute(void* f, int attribute, int value) {
    auto* fn = static_cast<Function*>(f);
    if (!fn) return CUDA_ERROR_INVALID_HANDLE;
    if (attribute == 8) {  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        if (value < 0 || value > kMaxSharedPerBlockOptin) return CUDA_ERROR_INVALID_VALUE;
        fn->max_dynamic_shared = value;
    }
    return CUDA_SUCCESS;
}

API CUresult cuFuncGetAttribute(int* v, int attribute, void* f) {
    auto* fn = static_cast<Function*>(f);
    if (!fn) return CUDA_ERROR_INVALID_HANDLE;
    switch (attribute) {
        case 0: *v = 1024; break;  // max threads per block
        case 8: *v = fn->max_dynamic_shared; break;
        default: *v = 0; break;
    }
    return CUDA_SUCCESS;
}

API CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                            unsigned shared, CUstream, void** params, void** extra) {
    auto* fn = static_cast<Function*>(f);
    if (!fn) return CUDA_ERROR_INVALID_HANDLE;
    if (extra) return CUDA_ERROR_NOT_SUPPORTED;
    if (gx == 0 || gy == 0 || gz == 0 || bx == 0 || by == 0 || bz == 0) return CUDA_ERROR_INVALID_VALUE;
    if (gy > 65535 || gz > 65535 || bx > 1024 || by > 1024 || bz > 64) return CUDA_ERROR_INVALID_VALUE;
    if ((unsigned long long)bx * by * bz > 1024) return CUDA_ERROR_INVALID_VALUE;
    if ((int)shared > fn->max_dynamic_shared) {
        fprintf(stderr, "mvar CUDA emulator: %s asks for %u bytes of dynamic shared memory, allowed %d\n",
                fn->name.c_str(), shared, fn->max_dynamic_shared);
        return CUDA_ERROR_INVALID_VALUE;
    }
    ++g_launches;
    if (kernels_skipped()) return CUDA_SUCCESS;
    t_running_kernel = fn->name.c_str();
    if (fn->module->set_max_dynamic_shared) fn->module->set_max_dynamic_shared((size_t)fn->max_dynamic_shared);
    int r = fn->module->launch(fn->name.c_str(), gx, gy, gz, bx, by, bz, shared, params);
    t_running_kernel = nullptr;
    // 3: more threads than the kernel's __launch_bounds__ allow (device.h), which the GPU
    // reports as too many resources requested.
    return r == 0 ? CUDA_SUCCESS : r == 3 ? CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES : CUDA_ERROR_LAUNCH_FAILED;
}

// ------------------------------------------------------------------------------------------------
// errors

API CUresult cuGetErrorName(CUresult e, const char** s) {
    switch (e) {
        case CUDA_SUCCESS: *s = "CUDA_SUCCESS"; break;
        case CUDA_ERROR_INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; break;
        case CUDA_ERROR_OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
        case CUDA_ERROR_INVALID_DEVICE: *s = "CUDA_ERROR_INVALID_DEVICE"; break;
        case CUDA_ERROR_INVALID_IMAGE: *s = "CUDA_ERROR_INVALID_IMAGE"; break;
        case CUDA_ERROR_INVALID_HANDLE: *s = "CUDA_ERROR_INVALID_HANDLE"; break;
        case CUDA_ERROR_NOT_FOUND: *s = "CUDA_ERROR_NOT_FOUND"; break;
        case CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: *s = "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES"; break;
        case CUDA_ERROR_LAUNCH_FAILED: *s = "CUDA_ERROR_LAUNCH_FAILED"; break;
        case CUDA_ERROR_NOT_SUPPORTED: *s = "CUDA_ERROR_NOT_SUPPORTED"; break;
        default: *s = "CUDA_ERROR_UNKNOWN"; break;
    }
    return CUDA_SUCCESS;
}

API CUresult cuGetErrorString(CUresult e, const char** s) { return cuGetErrorName(e, s); }
