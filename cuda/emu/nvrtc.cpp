// nvrtc.cpp: libnvrtc.so of mvar's CUDA emulator. "Compiling" a program builds its emulated
// module with g++ (so that a kernel that does not compile fails here, with the compiler's log, as
// under NVRTC) and hands back the source as the "CUBIN"; the emulated driver loads that.
// Only the entry points cudarc calls for mvar are provided.
#include <cstring>
#include <string>

#include "compile.h"

typedef int nvrtcResult;
enum {
    NVRTC_SUCCESS = 0,
    NVRTC_ERROR_INVALID_INPUT = 3,
    NVRTC_ERROR_INVALID_PROGRAM = 4,
    NVRTC_ERROR_COMPILATION = 6,
};

struct EmuProgram {
    std::string source;
    std::string log;
    std::string cubin;
};
typedef EmuProgram* nvrtcProgram;

#define API extern "C" __attribute__((visibility("default")))

API const char* nvrtcGetErrorString(nvrtcResult r) {
    switch (r) {
        case NVRTC_SUCCESS: return "NVRTC_SUCCESS";
        case NVRTC_ERROR_INVALID_INPUT: return "NVRTC_ERROR_INVALID_INPUT";
        case NVRTC_ERROR_INVALID_PROGRAM: return "NVRTC_ERROR_INVALID_PROGRAM";
        case NVRTC_ERROR_COMPILATION: return "NVRTC_ERROR_COMPILATION";
        default: return "NVRTC_ERROR (mvar emulator)";
    }
}

API nvrtcResult nvrtcVersion(int* major, int* minor) {
    *major = 13;
    *minor = 0;
    return NVRTC_SUCCESS;
}

API nvrtcResult nvrtcCreateProgram(nvrtcProgram* prog, const char* src, const char*, int num_headers,
                                   const char* const*, const char* const*) {
    if (!prog || !src) return NVRTC_ERROR_INVALID_INPUT;
    if (num_headers != 0) return NVRTC_ERROR_INVALID_INPUT;  // mvar passes its header inline
    *prog = new EmuProgram{src, "", ""};
    return NVRTC_SUCCESS;
}

API nvrtcResult nvrtcDestroyProgram(nvrtcProgram* prog) {
    if (!prog || !*prog) return NVRTC_ERROR_INVALID_PROGRAM;
    delete *prog;
    *prog = nullptr;
    return NVRTC_SUCCESS;
}

API nvrtcResult nvrtcCompileProgram(nvrtcProgram prog, int, const char* const*) {
    if (!prog) return NVRTC_ERROR_INVALID_PROGRAM;
    std::string log;
    std::string so = mvar_emu_build::build_module(prog->source, log);
    prog->log = log;
    if (so.empty()) return NVRTC_ERROR_COMPILATION;
    // NUL-terminated: the driver reads the image as a C string (cuModuleLoadData gets no size).
    prog->cubin = mvar_emu_build::kMagic + prog->source;
    prog->cubin.push_back('\0');
    return NVRTC_SUCCESS;
}

API nvrtcResult nvrtcGetProgramLogSize(nvrtcProgram prog, size_t* size) {
    if (!prog) return NVRTC_ERROR_INVALID_PROGRAM;
    *size = prog->log.size() + 1;
    return NVRTC_SUCCESS;
}

API nvrtcResult nvrtcGetProgramLog(nvrtcProgram prog, char* log) {
    if (!prog) return NVRTC_ERROR_INVALID_PROGRAM;
    std::memcpy(log, prog->log.c_str(), prog->log.size() + 1);
    return NVRTC_SUCCESS;
}

API nvrtcResult nvrtcGetCUBINSize(nvrtcProgram prog, size_t* size) {
    if (!prog || prog->cubin.empty()) return NVRTC_ERROR_INVALID_PROGRAM;
    *size = prog->cubin.size();
    return NVRTC_SUCCESS;
}

API nvrtcResult nvrtcGetCUBIN(nvrtcProgram prog, char* cubin) {
    if (!prog || prog->cubin.empty()) return NVRTC_ERROR_INVALID_PROGRAM;
    std::memcpy(cubin, prog->cubin.data(), prog->cubin.size());
    return NVRTC_SUCCESS;
}

API nvrtcResult nvrtcGetPTXSize(nvrtcProgram prog, size_t* size) { return nvrtcGetCUBINSize(prog, size); }

API nvrtcResult nvrtcGetPTX(nvrtcProgram prog, char* ptx) { return nvrtcGetCUBIN(prog, ptx); }
