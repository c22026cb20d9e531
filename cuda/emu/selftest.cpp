// selftest.cpp: checks that the emulator's adversarial modes (device.h, `Modes`) expose the bugs
// they are meant to expose, so that a parity run in those modes means something. Each case is a
// small kernel with a planted synchronisation bug, plus its corrected twin; the expected outcome
// depends on the mode read from the environment (MVAR_EMU_SCHEDULE, MVAR_EMU_CP_ASYNC).
// tools/cuda-emu.sh --self-test builds this and runs it in every combination of the modes.
#include <dlfcn.h>
#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <ctime>
#include <thread>

#include "device.h"
#include "compile.h"

namespace {

constexpr int kThreads = 64;

float* smem_floats() { return reinterpret_cast<float*>(mvar_emu::g_launch->dyn_smem); }

// Thread 0 publishes a value that every thread reads, with or without the barrier in between.
__global__ void published_by_first_thread(float* out, int with_barrier) {
    float* s = smem_floats();
    if (threadIdx.x == 0) s[0] = 1.0f;
    if (with_barrier) __syncthreads();
    out[threadIdx.x] = s[0];
}

// The mirror case: the last thread publishes.
__global__ void published_by_last_thread(float* out, int with_barrier) {
    float* s = smem_floats();
    if (threadIdx.x == blockDim.x - 1) s[0] = 1.0f;
    if (with_barrier) __syncthreads();
    out[threadIdx.x] = s[0];
}

// Each thread copies 16 bytes with cp.async into its own slot, then reads them back: after
// wait_group `wait_mode` (0: wait_group 0; 1: wait_group 1 with a newer, empty group committed
// after the copy's group; 2: wait_group 0 before committing the copy; 3: no wait at all).
__global__ void copy_then_read(const float* in, float* out, int wait_mode) {
    float* s = smem_floats() + 4 * threadIdx.x;
    mvar_emu_cp_async16(s, in + 4 * threadIdx.x);
    if (wait_mode == 2) mvar_emu_cp_wait(0);  // the copy is not committed: nothing to wait for
    mvar_emu_cp_commit();
    if (wait_mode == 1) mvar_emu_cp_commit();
    if (wait_mode == 0) mvar_emu_cp_wait(0);
    if (wait_mode == 1) mvar_emu_cp_wait(1);
    out[threadIdx.x] = s[0];
    mvar_emu_cp_wait(0);  // nothing may be in flight at exit
}

// Two groups in flight, wait_group 1: only the older one must have landed.
__global__ void two_groups_wait_one(const float* in, float* out) {
    float* s = smem_floats() + 8 * threadIdx.x;
    mvar_emu_cp_async16(s, in);
    mvar_emu_cp_commit();
    mvar_emu_cp_async16(s + 4, in);
    mvar_emu_cp_commit();
    mvar_emu_cp_wait(1);
    out[2 * threadIdx.x] = s[0];
    out[2 * threadIdx.x + 1] = s[4];
    mvar_emu_cp_wait(0);
}

// Block 1 reads what block 0 writes to global memory: no GPU orders the blocks of a launch.
__global__ void reads_the_previous_block(float* out) {
    if (threadIdx.x == 0) out[blockIdx.x] = blockIdx.x == 0 ? 1.0f : out[blockIdx.x - 1];
}

// Block 0 fills a static shared array; the other blocks read it without writing it. The
// declaration is followed by the call compile.h inserts after every static __shared__ one.
__global__ void reads_static_shared_before_writing(float* out) {
    __shared__ float s[32];
    mvar_emu::poison_shared(&s, sizeof(s));
    if (blockIdx.x == 0) s[threadIdx.x] = 1.0f;
    __syncthreads();
    out[blockIdx.x * blockDim.x + threadIdx.x] = s[threadIdx.x];
}

// The same for the dynamic shared memory.
__global__ void reads_dynamic_shared_before_writing(float* out) {
    float* s = smem_floats();
    if (blockIdx.x == 0) s[threadIdx.x] = 1.0f;
    __syncthreads();
    out[blockIdx.x * blockDim.x + threadIdx.x] = s[threadIdx.x];
}

// 40000 bytes of static shared memory, next to whatever dynamic shared memory the launch gives.
__global__ void static_shared_next_to_dynamic(float* out) {
    __shared__ float big[10000];
    mvar_emu::poison_shared(&big, sizeof(big));
    big[threadIdx.x] = 1.0f;
    out[threadIdx.x] = big[threadIdx.x];
}

// Returns with a copy in flight (a bug the deferred mode reports).
__global__ void exits_with_copy_in_flight(const float* in) {
    mvar_emu_cp_async16(smem_floats() + 4 * threadIdx.x, in);
    mvar_emu_cp_commit();
}

// Thread 0 waits for its warp while the rest of the block waits for thread 0: the GPU would hang.
__global__ void mismatched_barriers(float* out) {
    if (threadIdx.x == 0) {
        __syncwarp();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 0.0f;
}

// Thread 0 copies 16 bytes from in + src_floats to byte dst_bytes of the shared memory; the
// hardware requires both addresses 16-byte aligned and the destination inside shared memory.
__global__ void copy_at(const float* in, int src_floats, int dst_bytes) {
    if (threadIdx.x == 0) {
        mvar_emu_cp_async16(mvar_emu::g_launch->dyn_smem + dst_bytes, in + src_floats);
        mvar_emu_cp_commit();
        mvar_emu_cp_wait(0);
    }
}

// ldmatrix with lane l's row at byte offset + 16 l (the rows must be 16-byte aligned).
__global__ void ldmatrix_at(float* out, int offset) {
    unsigned r[4];
    mvar_emu_ldmatrix_x4(r, (unsigned)(offset + 16 * (threadIdx.x % 32)), false);
    out[threadIdx.x] = (float)r[0];
}

// The lanes below `live` of each warp sum their values with xor shuffles of distance `first`
// down to 1; the other lanes have returned. Distances below `live` (a power of two) read live
// lanes only; a larger one reads a lane that exited, which the GPU leaves undefined. Each
// thread's value is 1, so a correct sum is `first * 2`.
__global__ void shuffle_sum_of_live_lanes(float* out, int live, int first) {
    if ((int)(threadIdx.x % 32) >= live) return;
    float v = 1.0f;
    for (int o = first; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    out[threadIdx.x] = v;
}

// The lanes below `live` of each warp (the others have returned) vote: a ballot of
// (lane % 3 == 0), any of (lane >= live), all of (lane < live) and all of (lane even); out gets
// the ballot's bits (as a float: exact below 2^24 with live <= 16), the any, and the two alls.
__global__ void votes_of_live_lanes(float* out, int live) {
    int l = threadIdx.x % 32;
    if (l >= live) return;
    unsigned bits = __ballot_sync(0xffffffffu, l % 3 == 0);
    int any_big = __any_sync(0xffffffffu, l >= live);
    int all_live = __all_sync(0xffffffffu, l < live);
    int all_even = __all_sync(0xffffffffu, l % 2 == 0);
    out[3 * threadIdx.x] = (float)bits;
    out[3 * threadIdx.x + 1] = (float)any_big;
    out[3 * threadIdx.x + 2] = (float)(all_live + 2 * all_even);
}

// Lane `exiting` returns, then the rest of the warp runs an ldmatrix (.aligned: every lane must).
__global__ void ldmatrix_without_a_lane(float* out, int exiting) {
    if ((int)threadIdx.x == exiting) return;
    unsigned r[4];
    mvar_emu_ldmatrix_x4(r, (unsigned)(16 * (threadIdx.x % 32)), false);
    out[threadIdx.x] = (float)r[0];
}

mvar_emu::Registrar r1("published_by_first_thread", &published_by_first_thread);
mvar_emu::Registrar r2("published_by_last_thread", &published_by_last_thread);
mvar_emu::Registrar r3("copy_then_read", &copy_then_read);
mvar_emu::Registrar r4("two_groups_wait_one", &two_groups_wait_one);
mvar_emu::Registrar r5("exits_with_copy_in_flight", &exits_with_copy_in_flight);
mvar_emu::Registrar r7("reads_the_previous_block", &reads_the_previous_block);
mvar_emu::Registrar r8("reads_static_shared_before_writing", &reads_static_shared_before_writing);
mvar_emu::Registrar r6("mismatched_barriers", &mismatched_barriers);
mvar_emu::Registrar r9("copy_at", &copy_at);
mvar_emu::Registrar r11("reads_dynamic_shared_before_writing", &reads_dynamic_shared_before_writing);
mvar_emu::Registrar r10("ldmatrix_at", &ldmatrix_at);
mvar_emu::Registrar r12("static_shared_next_to_dynamic", &static_shared_next_to_dynamic);
mvar_emu::Registrar r13("shuffle_sum_of_live_lanes", &shuffle_sum_of_live_lanes);
mvar_emu::Registrar r14("ldmatrix_without_a_lane", &ldmatrix_without_a_lane);
mvar_emu::Registrar r15("votes_of_live_lanes", &votes_of_live_lanes);

int failures = 0;

void expect(bool ok, const std::string& what) {
    printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
    if (!ok) ++failures;
}

template <typename... A>
void launch(const char* name, A... args) {
    void* params[] = {static_cast<void*>(&args)...};
    if (mvar_emu_launch(name, 1, 1, 1, kThreads, 1, 1, 16 * kThreads * sizeof(float), params) != 0) {
        fprintf(stderr, "selftest: could not launch %s\n", name);
        exit(2);
    }
}

// Runs `body` in a child process; true when the child died of SIGABRT (the emulator's report).
template <typename F>
bool aborts(F body) {
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        int devnull = open("/dev/null", O_WRONLY);
        if (devnull >= 0) dup2(devnull, 2);  // the report itself is not part of the output
        body();
        _exit(0);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    return WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT;
}

// A module's launcher: mvar_emu_launch(name, grid x y z, block x y z, dynamic shared bytes, params).
using LaunchFn = int (*)(const char*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, size_t, void**);

// Builds `src` the way the fake NVRTC and driver do and loads it; null (and a failed check named
// `what`) when that fails.
LaunchFn build_and_load(const std::string& src, const std::string& what) {
    std::string log;
    const std::string so = mvar_emu_build::build_module(src, log);
    void* h = so.empty() ? nullptr : dlopen(so.c_str(), RTLD_NOW | RTLD_LOCAL);
    auto run = h ? reinterpret_cast<LaunchFn>(dlsym(h, "mvar_emu_launch")) : nullptr;
    expect(run != nullptr, what + " builds and loads" + (log.empty() ? "" : ": " + log));
    return run;
}

// How many of the threads read the published value (the others read the NaN fill).
int readers_of_one(const std::vector<float>& out) {
    int n = 0;
    for (float v : out) n += v == 1.0f;
    return n;
}

}  // namespace

int main(int argc, char** argv) {
    const auto& m = mvar_emu::modes();
    printf("emulator self-test: schedule %s, cp.async %s\n", m.reverse ? "reverse" : "forward",
           m.deferred_copies ? "deferred" : "eager");
    std::vector<float> out(2 * kThreads), in(4 * kThreads);
    for (int i = 0; i < 4 * kThreads; ++i) in[i] = 1.0f;

    for (int with_barrier = 0; with_barrier < 2; ++with_barrier) {
        const char* how = with_barrier ? "with the barrier" : "without a barrier";
        launch("published_by_first_thread", out.data(), with_barrier);
        int first = readers_of_one({out.begin(), out.begin() + kThreads});
        launch("published_by_last_thread", out.data(), with_barrier);
        int last = readers_of_one({out.begin(), out.begin() + kThreads});
        if (with_barrier) {
            expect(first == kThreads && last == kThreads, std::string("every thread sees a value published ") + how);
        } else if (m.reverse) {
            expect(first == 1, "reverse order: a value thread 0 publishes without a barrier is seen only by itself");
            expect(last == kThreads, "reverse order: the last thread runs first");
        } else {
            expect(last == 1, "forward order: a value the last thread publishes without a barrier is seen only by itself");
            expect(first == kThreads, "forward order: thread 0 runs first");
        }
    }

    const char* waits[] = {"wait_group 0", "wait_group 1 behind a newer empty group",
                           "wait_group 0 before the commit", "no wait"};
    for (int mode = 0; mode < 4; ++mode) {
        launch("copy_then_read", in.data(), out.data(), mode);
        int landed = readers_of_one({out.begin(), out.begin() + kThreads});
        bool should_land = !m.deferred_copies || mode <= 1;
        expect(landed == (should_land ? kThreads : 0),
               std::string("cp.async read after ") + waits[mode] + (should_land ? " has landed" : " has not landed"));
    }

    launch("two_groups_wait_one", in.data(), out.data());
    int older = 0, newer = 0;
    for (int t = 0; t < kThreads; ++t) {
        older += out[2 * t] == 1.0f;
        newer += out[2 * t + 1] == 1.0f;
    }
    expect(older == kThreads && newer == (m.deferred_copies ? 0 : kThreads),
           "wait_group 1 lands the older of two groups only (deferred) or both (eager)");

    out[0] = out[1] = 0.0f;
    {
        float* p = out.data();
        void* params[] = {&p};
        mvar_emu_launch("reads_the_previous_block", 2, 1, 1, 32, 1, 1, 0, params);
    }
    expect(out[1] == (m.reverse ? 0.0f : 1.0f), m.reverse ? "reverse order: block 1 runs before block 0"
                                                          : "forward order: block 0 runs before block 1");

    // Block 0 writes the shared memory, block 1 only reads it: block 1 must see the NaN fill.
    auto second_block_sees_nan = [&](const char* kernel, size_t dynamic_bytes) {
        float* p = out.data();
        void* params[] = {&p};
        mvar_emu_launch(kernel, 2, 1, 1, 32, 1, 1, dynamic_bytes, params);
        int block0 = 0, block1 = 0;
        for (int t = 0; t < 32; ++t) {
            block0 += out[t] == 1.0f;
            block1 += std::isnan(out[32 + t]);
        }
        return block0 == 32 && block1 == 32;
    };
    expect(second_block_sees_nan("reads_static_shared_before_writing", 0),
           "a block reading a static shared array it never wrote sees NaN, not another block's values");
    expect(second_block_sees_nan("reads_dynamic_shared_before_writing", 32 * sizeof(float)),
           "a block reading dynamic shared memory it never wrote sees NaN, not another block's values");
    {
        const std::string src =
            "void k() {\n    __shared__ float scratch[32];\n    __shared__ __align__(16) float zs[A][B + 4];\n"
            "    x = 1; __shared__ double d[2][3];\n}\nextern __shared__ float4 att_smem[];\n"
            "// a __shared__ word in a comment;\n";
        const std::string got = mvar_emu_build::poison_static_shared(src);
        auto has = [&](const char* s) { return got.find(s) != std::string::npos; };
        expect(has("float scratch[32]; mvar_emu::poison_shared(&scratch, sizeof(scratch));") &&
                   has("float zs[A][B + 4]; mvar_emu::poison_shared(&zs, sizeof(zs));") &&
                   has("double d[2][3]; mvar_emu::poison_shared(&d, sizeof(d));") &&
                   has("extern __shared__ float4 att_smem[];\n") && has("in a comment;\n"),
               "every static __shared__ declaration, and only those, gets the fill call");
    }

    bool died = aborts([&] { launch("exits_with_copy_in_flight", in.data()); });
    expect(died == m.deferred_copies, m.deferred_copies ? "a thread exiting with a copy in flight is reported"
                                                        : "eager copies have always landed at exit");
    expect(aborts([&] { launch("mismatched_barriers", out.data()); }),
           "barriers that cannot complete are reported as a deadlock");

    const int smem_bytes = 16 * kThreads * sizeof(float);
    expect(!aborts([&] { launch("copy_at", in.data(), 4, smem_bytes - 16); }) &&
               !aborts([&] { launch("ldmatrix_at", out.data(), 16); }),
           "aligned cp.async and ldmatrix inside the shared memory run");
    expect(aborts([&] { launch("copy_at", in.data(), 1, 0); }), "a misaligned cp.async source is reported");
    expect(aborts([&] { launch("copy_at", in.data(), 0, 8); }), "a misaligned cp.async destination is reported");
    expect(aborts([&] { launch("copy_at", in.data(), 0, smem_bytes); }),
           "a cp.async past the end of the shared memory is reported");
    expect(aborts([&] { launch("ldmatrix_at", out.data(), 8); }), "a misaligned ldmatrix row is reported");
    expect(!aborts([&] { launch("ldmatrix_without_a_lane", out.data(), -1); }) &&
               aborts([&] { launch("ldmatrix_without_a_lane", out.data(), 31); }),
           "an ldmatrix in a warp with an exited lane is reported");

    {
        // Shuffles read only lanes that take part: with 16 live lanes per warp, distances 8..1
        // stay among them and sum to 16; starting at 16 reads the exited half, which gives NaN.
        // The same in a partial warp: a 48-thread block's second warp has lanes 0..15 only.
        // sums(...) is (all of threads [from, to) got the sum, all of them got NaN).
        auto sums = [&](int threads, int live, int first, int from, int to) {
            std::fill(out.begin(), out.end(), 0.0f);
            float* p = out.data();
            void* params[] = {&p, &live, &first};
            mvar_emu_launch("shuffle_sum_of_live_lanes", 1, 1, 1, threads, 1, 1, 0, params);
            int right = 0, nan = 0, ran = 0;
            for (int t = from; t < to; ++t) {
                if (t % 32 >= live) continue;
                ++ran;
                right += out[t] == 2.0f * first;
                nan += std::isnan(out[t]);
            }
            return std::make_pair(ran > 0 && right == ran, ran > 0 && nan == ran);
        };
        expect(sums(64, 16, 8, 0, 64).first && sums(64, 32, 16, 0, 64).first,
               "shuffles among the lanes that take part give their values");
        expect(sums(64, 16, 16, 0, 64).second,
               "a shuffle reading a lane that exited gives NaN, not a stale or own value");
        expect(sums(48, 32, 8, 0, 48).first && sums(48, 32, 16, 0, 32).first && sums(48, 32, 16, 32, 48).second,
               "a shuffle reading a lane missing from a partial warp gives NaN");
    }

    {
        // Votes count the lanes that take part only: with 16 live lanes the ballot of
        // (lane % 3 == 0) has bits 0, 3, .., 15; nobody is >= 16; all live lanes are < 16; not
        // all are even.
        std::vector<float> votes(3 * 64, -1.0f);
        float* p = votes.data();
        int live = 16;
        void* params[] = {&p, &live};
        mvar_emu_launch("votes_of_live_lanes", 1, 1, 1, 64, 1, 1, 0, params);
        unsigned want = 0;
        for (int l = 0; l < 16; l += 3) want |= 1u << l;
        bool right = true;
        for (int t = 0; t < 64; ++t) {
            if (t % 32 >= live) continue;
            right = right && votes[3 * t] == (float)want && votes[3 * t + 1] == 0.0f && votes[3 * t + 2] == 1.0f;
        }
        expect(right, "ballot, any and all see the lanes that take part");
    }

    {
        // Static plus dynamic shared memory: 48 KiB without opting in; with an opted-in dynamic
        // maximum, static plus that maximum up to 227 KiB.
        auto fails = [&](size_t max_dynamic, size_t dynamic) {
            return aborts([&] {
                mvar_emu_set_max_dynamic_shared(max_dynamic);
                float* p = out.data();
                void* params[] = {&p};
                mvar_emu_launch("static_shared_next_to_dynamic", 1, 1, 1, 32, 1, 1, dynamic, params);
            });
        };
        expect(!fails(48 * 1024, 4096) && fails(48 * 1024, 16384),
               "without opting in, static and dynamic shared memory past 48 KiB is refused");
        expect(!fails(100 * 1024, 16384) && fails(200 * 1024, 16384),
               "opted in, static shared memory plus the dynamic maximum past 227 KiB is refused");
    }
    {
        // Launch bounds, through the module build the fake NVRTC and driver use: a block larger
        // than a kernel's __launch_bounds__, or above 256 threads for a kernel without them, is
        // refused as the GPU may refuse it.
        const std::string src =
            "#define BOUND (2 * 32)\n"
            "extern \"C\" __global__ void __launch_bounds__(BOUND, 1) bounded(float* out) { out[threadIdx.x] = 1.0f; }\n"
            "__global__ void unbounded(float* out) { out[threadIdx.x] = 1.0f; }\n";
        const LaunchFn run = build_and_load(src, "a module with launch bounds");
        if (run) {
            std::vector<float> buf(1024);
            float* p = buf.data();
            void* params[] = {&p};
            int quiet = dup(2), devnull = open("/dev/null", O_WRONLY);
            dup2(devnull, 2);  // the refusals' messages are not part of the output
            const int in_bounds = run("bounded", 1, 1, 1, 64, 1, 1, 0, params);
            const int past_bounds = run("bounded", 1, 1, 1, 32, 3, 1, 0, params);
            const int small = run("unbounded", 1, 1, 1, 256, 1, 1, 0, params);
            const int large = run("unbounded", 1, 1, 1, 512, 1, 1, 0, params);
            dup2(quiet, 2);
            expect(in_bounds == 0 && past_bounds == 3, "a block past the kernel's __launch_bounds__ is refused");
            expect(small == 0 && large == 3, "past 256 threads a kernel without __launch_bounds__ is refused");
        }
    }
    {
        // MVAR_EMU_SANITIZE's checks, through the module build the fake NVRTC and driver use: a
        // misaligned 16-byte load and an index past a fixed-size shared array each trap.
        setenv("MVAR_EMU_SANITIZE", "1", 1);
        const std::string src =
            "__global__ void load16(const float* p, int offset, float* out) {\n"
            "    float4 v = *reinterpret_cast<const float4*>(p + offset);\n    out[0] = v.x + v.w;\n}\n"
            "__global__ void index_shared(int i, float* out) {\n"
            "    __shared__ float s[32];\n    s[i] = 1.0f;\n    out[0] = s[i];\n}\n";
        const LaunchFn run = build_and_load(src, "a sanitized module");
        if (run) {
            // Dies of SIGILL (the trap) rather than running to completion.
            auto traps = [&](const char* kernel, std::vector<void*> params) {
                fflush(stdout);
                pid_t pid = fork();
                if (pid == 0) {
                    int devnull = open("/dev/null", O_WRONLY);
                    if (devnull >= 0) dup2(devnull, 2);
                    _exit(run(kernel, 1, 1, 1, 1, 1, 1, 0, params.data()) == 0 ? 0 : 3);
                }
                int status = 0;
                waitpid(pid, &status, 0);
                if (WIFEXITED(status) && WEXITSTATUS(status) == 3) return -1;  // not launched
                return WIFSIGNALED(status) && WTERMSIG(status) == SIGILL ? 1 : 0;
            };
            alignas(16) float data[8] = {};
            float result = 0.0f;
            const float* p = data;
            float* r = &result;
            int aligned = 0, misaligned = 1, inside = 31, outside = 32;
            expect(traps("load16", {&p, &aligned, &r}) == 0 && traps("load16", {&p, &misaligned, &r}) == 1,
                   "sanitized: a misaligned 16-byte load traps, an aligned one runs");
            expect(traps("index_shared", {&inside, &r}) == 0 && traps("index_shared", {&outside, &r}) == 1,
                   "sanitized: an index past a static shared array traps, one inside runs");
        }
        unsetenv("MVAR_EMU_SANITIZE");
    }

    if (__builtin_cpu_supports("fma")) {
        // FMA contraction (MVAR_EMU_FMA=1 adds these flags): a * b - c with c the rounded product
        // fuses into the product's rounding error, as on the GPU; __fmul_rn stays rounded (0).
        const std::string src =
            "__global__ void product_minus(const float* in, float* out) {\n"
            "    out[0] = in[0] * in[1] - in[2];\n    out[1] = __fmul_rn(in[0], in[1]) - in[2];\n}\n";
        auto run_with = [&](const char* opt) {
            setenv("MVAR_EMU_OPT", opt, 1);
            const LaunchFn run = build_and_load(src, std::string("a module built with ") + opt);
            unsetenv("MVAR_EMU_OPT");
            volatile float a = 0.1f, b = 0.3f;
            float in[3] = {a, b, a * b}, result[2] = {-1.0f, -1.0f};
            const float* pi = in;
            float* po = result;
            void* params[] = {&pi, &po};
            if (run) run("product_minus", 1, 1, 1, 1, 1, 1, 0, params);
            return std::make_pair(result[0], result[1]);
        };
        const auto plain = run_with("-O2");
        const auto fused = run_with("-O2 -mfma -ffp-contract=fast");
        expect(plain.first == 0.0f && plain.second == 0.0f, "without FMA contraction a * b - round(a * b) is 0");
        expect(fused.first != 0.0f && fused.second == 0.0f,
               "with FMA contraction a * b - round(a * b) is the product's rounding error, and __fmul_rn's is 0");
    } else {
        printf("skip this CPU has no FMA instructions: the contraction cases did not run\n");
    }

    {
        // Test threads of one process build the same module at once after a shared header
        // changes: every one must get it (a source no earlier run has cached, so all build).
        const std::string src = "// concurrent build " + std::to_string(getpid()) + "-" +
                                std::to_string((long long)time(nullptr)) +
                                "\n__global__ void nothing(int* p) { if (p) *p = 1; }\n";
        std::vector<std::string> built(6);
        std::vector<std::thread> threads;
        for (size_t i = 0; i < built.size(); ++i) {
            threads.emplace_back([&, i] {
                std::string log;
                built[i] = mvar_emu_build::build_module(src, log);
            });
        }
        for (auto& t : threads) t.join();
        bool all = true;
        for (const auto& so : built) all = all && !so.empty() && access(so.c_str(), R_OK) == 0;
        expect(all, "six threads building one new module at once all get it");
    }

    if (argc > 1) {
        // The emulated driver's device memory (argv[1]: its libcuda.so), each case in a child
        // process since the guard placement is read once per process.
        auto in_child = [&](const char* guard, auto body) {
            fflush(stdout);
            pid_t pid = fork();
            if (pid == 0) {
                int devnull = open("/dev/null", O_WRONLY);
                if (devnull >= 0) dup2(devnull, 2);
                if (guard) setenv("MVAR_EMU_GUARD", guard, 1);
                void* h = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
                auto init = h ? reinterpret_cast<int (*)(unsigned)>(dlsym(h, "cuInit")) : nullptr;
                auto alloc = h ? reinterpret_cast<int (*)(unsigned long long*, size_t)>(dlsym(h, "cuMemAlloc_v2"))
                               : nullptr;
                unsigned long long p = 0;
                if (!init || !alloc || init(0) != 0 || alloc(&p, 100) != 0) _exit(3);
                _exit(body(reinterpret_cast<volatile unsigned char*>(p)) ? 0 : 4);
            }
            int status = 0;
            waitpid(pid, &status, 0);
            if (WIFSIGNALED(status)) return WTERMSIG(status) == SIGSEGV ? std::string("fault") : "signal";
            return std::string(WIFEXITED(status) && WEXITSTATUS(status) == 0 ? "ok" : "failed");
        };
        // 100 bytes: the buffer is rounded to 256, which the end guard follows.
        expect(in_child(nullptr, [](volatile unsigned char* p) { return p[0] == 0xff && p[255] == 0xff; }) == "ok",
               "fresh device memory is NaN-filled, not zero");
        expect(in_child(nullptr, [](volatile unsigned char* p) { return p[256] == 0; }) == "fault",
               "a read just past a device buffer faults");
        expect(in_child("front", [](volatile unsigned char* p) { return p[-1] == 0; }) == "fault",
               "with MVAR_EMU_GUARD=front a read just before a device buffer faults");
        expect(in_child("front", [](volatile unsigned char* p) { return p[0] == 0xff && p[99] == 0xff; }) == "ok",
               "with MVAR_EMU_GUARD=front the buffer itself is readable");

        // The host-cost mode (MVAR_EMU_KERNELS=skip): a kernel that writes its output, launched
        // through the driver, writes it in the normal mode and leaves it alone when skipped;
        // fresh memory is zero there and a memset does not reach it. 0: as expected.
        auto launch_in_child = [&](bool skip) {
            fflush(stdout);
            pid_t pid = fork();
            if (pid == 0) {
                int devnull = open("/dev/null", O_WRONLY);
                if (devnull >= 0) dup2(devnull, 2);
                if (skip) setenv("MVAR_EMU_KERNELS", "skip", 1);
                void* h = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
                if (!h) _exit(3);
                auto sym = [&](const char* name) { return dlsym(h, name); };
                auto init = reinterpret_cast<int (*)(unsigned)>(sym("cuInit"));
                auto alloc = reinterpret_cast<int (*)(unsigned long long*, size_t)>(sym("cuMemAlloc_v2"));
                auto memset8 = reinterpret_cast<int (*)(unsigned long long, unsigned char, size_t)>(sym("cuMemsetD8_v2"));
                auto load = reinterpret_cast<int (*)(void**, const void*)>(sym("cuModuleLoadData"));
                auto get = reinterpret_cast<int (*)(void**, void*, const char*)>(sym("cuModuleGetFunction"));
                auto go = reinterpret_cast<int (*)(void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                                                   unsigned, void*, void**, void**)>(sym("cuLaunchKernel"));
                const std::string image = mvar_emu_build::kMagic +
                                          "__global__ void write_seven(float* out) { out[threadIdx.x] = 7.0f; }\n";
                unsigned long long p = 0, q = 0;
                void *module = nullptr, *f = nullptr;
                if (!init || !alloc || !memset8 || !load || !get || !go || init(0) != 0 || alloc(&p, 256) != 0 ||
                    alloc(&q, 256) != 0 || load(&module, image.c_str()) != 0 || get(&f, module, "write_seven") != 0)
                    _exit(3);
                const float fresh = reinterpret_cast<float*>(p)[5];
                if (memset8(q, 0x3f, 256) != 0) _exit(3);
                const unsigned char set = reinterpret_cast<unsigned char*>(q)[9];
                float* out = reinterpret_cast<float*>(p);
                void* params[] = {&out};
                if (go(f, 1, 1, 1, 32, 1, 1, 0, nullptr, params, nullptr) != 0) _exit(3);
                const bool wrote = out[5] == 7.0f;
                const bool right = skip ? fresh == 0.0f && set == 0 && !wrote
                                        : std::isnan(fresh) && set == 0x3f && wrote;
                _exit(right ? 0 : 4);
            }
            int status = 0;
            waitpid(pid, &status, 0);
            return WIFEXITED(status) ? WEXITSTATUS(status) : 5;
        };
        expect(launch_in_child(false) == 0, "a launch through the driver runs the kernel; memory starts NaN, memsets land");
        expect(launch_in_child(true) == 0,
               "MVAR_EMU_KERNELS=skip: the launch is accepted and runs nothing; memory starts zero, memsets do not land");
    }

    printf("%s\n", failures ? "emulator self-test FAILED" : "emulator self-test passed");
    return failures ? 1 : 0;
}
