// compile.h: turns a kernel program (the source NVRTC would get) into a shared object that the
// emulated driver can load. Used by the fake NVRTC (to report compile errors where NVRTC would)
// and by the fake driver (to load a "CUBIN", which under emulation is the source itself).
//
// Steps: a scan pass (g++ -E with MVAR_EMU_SCAN) lists the `__global__` functions; the source is
// compiled with device.h in front and one `Registrar` per kernel appended, so the launcher finds
// each kernel by name and unpacks its parameters with the kernel's own signature. The result is
// cached by a hash of device.h, the optimisation flags ($MVAR_EMU_OPT, default -O2, plus the
// checks of $MVAR_EMU_SANITIZE) and the source in $MVAR_EMU_CACHE (default /tmp/mvar-emu-<uid>).
#pragma once

#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdint>
#include <fstream>
#include <regex>
#include <map>
#include <set>
#include <sstream>
#include <string>

#ifndef MVAR_EMU_DEVICE_H
#error "build with -DMVAR_EMU_DEVICE_H=\"/path/to/cuda/emu/device.h\""
#endif

namespace mvar_emu_build {

// Magic in front of the source in an emulated "CUBIN".
inline const std::string kMagic = "MVAR-EMU-MODULE\n";

inline uint64_t fnv1a(const std::string& s, uint64_t h = 0xcbf29ce484222325ull) {
    for (unsigned char c : s) {
        h ^= c;
        h *= 0x100000001b3ull;
    }
    return h;
}

inline std::string read_file(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

inline bool write_file(const std::string& path, const std::string& text) {
    std::ofstream f(path, std::ios::binary);
    f << text;
    return (bool)f;
}

// Runs a shell command, appending its output (stdout and stderr) to `out`; returns its status.
inline int run(const std::string& cmd, std::string& out) {
    FILE* p = popen((cmd + " 2>&1").c_str(), "r");
    if (!p) return -1;
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
    return pclose(p);
}

inline std::string cache_dir() {
    const char* d = getenv("MVAR_EMU_CACHE");
    std::string dir = d && *d ? d : "/tmp/mvar-emu-" + std::to_string(getuid());
    mkdir(dir.c_str(), 0755);
    return dir;
}

inline std::string compiler() {
    const char* c = getenv("MVAR_EMU_CXX");
    return c && *c ? c : "g++";
}

// Static `__shared__` arrays become thread_local statics (device.h), which keep what the previous
// block of the launch (or an earlier launch) left in them, so a kernel that reads one before
// writing it in this block would read plausible stale values where a GPU gives garbage. After
// each such declaration this inserts a call that fills the array with 0xff bytes (NaN as floats)
// when the first thread of a block passes it (no thread can have written it before that).
// `extern __shared__` declarations (dynamic shared memory, already 0xff) are left alone.
inline std::string poison_static_shared(const std::string& src) {
    static const std::regex decl(
        R"((\bextern\s+)?__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s+)?[A-Za-z_][\w:]*\s+([A-Za-z_]\w*)\s*(?:\[[^\];]*\]\s*)*;)");
    std::string out;
    auto last = src.cbegin();
    for (auto it = std::sregex_iterator(src.begin(), src.end(), decl); it != std::sregex_iterator(); ++it) {
        const auto& m = *it;
        out.append(last, m[0].second);
        if (!m[1].matched) out += " mvar_emu::poison_shared(&" + m[2].str() + ", sizeof(" + m[2].str() + "));";
        last = m[0].second;
    }
    out.append(last, src.cend());
    return out;
}

// The text of the first argument of a macro argument list ("2 * 64, 1" -> "2 * 64"): up to the
// first comma outside parentheses.
inline std::string first_argument(const std::string& args) {
    int depth = 0;
    for (size_t i = 0; i < args.size(); ++i) {
        if (args[i] == '(') ++depth;
        if (args[i] == ')') --depth;
        if (args[i] == ',' && depth == 0) return args.substr(0, i);
    }
    return args;
}

// Builds (or finds in the cache) the shared object of `source`. Returns its path, or "" with the
// compiler's messages in `log`.
inline std::string build_module(const std::string& original, std::string& log) {
    const std::string source = poison_static_shared(original);
    const std::string device_h = read_file(MVAR_EMU_DEVICE_H);
    if (device_h.empty()) {
        log = std::string("mvar emulator: cannot read ") + MVAR_EMU_DEVICE_H;
        return "";
    }
    const char* opt_env = getenv("MVAR_EMU_OPT");
    std::string opt = opt_env && *opt_env ? opt_env : "-O2";
    // MVAR_EMU_SANITIZE=1: checks for what faults on the GPU but not in C++ on x86 (a misaligned
    // vector access) or silently corrupts (an index past a fixed-size shared or local array),
    // plus other undefined operations. A failed check traps (SIGILL), which driver.cpp reports
    // with the kernel's name; no sanitizer runtime is needed.
    const char* sanitize = getenv("MVAR_EMU_SANITIZE");
    if (sanitize && *sanitize && std::string(sanitize) != "0") {
        opt += " -fsanitize=alignment,bounds,shift,integer-divide-by-zero,vla-bound,null,return,unreachable,"
               "pointer-overflow -fsanitize-undefined-trap-on-error";
    }
    char key[17];
    snprintf(key, sizeof key, "%016llx", (unsigned long long)fnv1a(source, fnv1a(opt, fnv1a(device_h))));
    const std::string dir = cache_dir();
    const std::string so = dir + "/" + key + ".so";
    if (access(so.c_str(), R_OK) == 0) return so;

    // Unique per build, not only per process: the test threads of one process can build the
    // same module at once (after a change to a shared header every test needs it), and with a
    // shared name one thread's rename would take the other's files away.
    static std::atomic<unsigned> builds{0};
    const std::string tag = std::to_string(getpid()) + "-" + std::to_string(builds.fetch_add(1)) + "-" + key;
    const std::string src_path = dir + "/" + tag + ".cpp";
    const std::string prelude = std::string("#include \"") + MVAR_EMU_DEVICE_H + "\"\n";
    if (!write_file(src_path, prelude + source)) {
        log = "mvar emulator: cannot write " + src_path;
        return "";
    }
    const std::string flags = "-std=c++20 -DMVAR_CUDA_EMU -fno-strict-aliasing -w -x c++";
    std::string scanned;
    if (run(compiler() + " " + flags + " -DMVAR_EMU_SCAN -E " + src_path, scanned) != 0) {
        log = scanned;
        unlink(src_path.c_str());
        return "";
    }
    // kernel name -> the first argument of its __launch_bounds__ (the maximum threads per block,
    // an expression with the macros expanded), "0" without.
    std::map<std::string, std::string> kernels;
    static const std::regex mark(
        R"(mvar_emu_kernel_mark\s+void\s+(?:mvar_emu_bounds\s*\(([^()]*(?:\([^()]*\)[^()]*)*)\)\s*)?([A-Za-z_]\w*)\s*\()");
    for (auto it = std::sregex_iterator(scanned.begin(), scanned.end(), mark); it != std::sregex_iterator(); ++it) {
        kernels[(*it)[2]] = (*it)[1].matched ? first_argument((*it)[1]) : "0";
    }
    std::string reg = "\nnamespace {\n";
    int i = 0;
    for (const auto& [k, bound] : kernels) {
        reg += "mvar_emu::Registrar mvar_emu_reg_" + std::to_string(i++) + "(\"" + k + "\", &" + k + ", (unsigned)(" +
               bound + "));\n";
    }
    reg += "}\n";
    if (!write_file(src_path, prelude + source + reg)) {
        log = "mvar emulator: cannot write " + src_path;
        return "";
    }
    const std::string tmp_so = dir + "/" + tag + ".so.tmp";
    std::string cmd = compiler() + " " + flags + " " + opt +
                      " -g0 -shared -fPIC -fvisibility=hidden -pthread -o " + tmp_so + " " + src_path;
    if (run(cmd, log) != 0) {
        unlink(tmp_so.c_str());
        return "";
    }
    unlink(src_path.c_str());
    // Another process may have built the same module meanwhile; rename replaces it atomically.
    if (rename(tmp_so.c_str(), so.c_str()) != 0) {
        log = "mvar emulator: cannot rename " + tmp_so + " to " + so;
        return "";
    }
    return so;
}

}  // namespace mvar_emu_build
