// host_cost.h: the switches of the emulator's host-cost mode, shared by the emulated driver and
// cuBLAS (separate libraries, so each has its own copy of the counters these switches gate).
// MVAR_EMU_KERNELS=skip: launches and GEMMs are checked and counted but not run (driver.cpp's
// header says what else changes); MVAR_EMU_STATS=1: print the counts at exit in the normal mode
// too.
#pragma once

#include <cstdlib>
#include <string>

namespace mvar_emu_host_cost {

inline bool env_is(const char* name, const char* value) {
    const char* v = std::getenv(name);
    return v && std::string(v) == value;
}

// Read once per process.
inline bool kernels_skipped() {
    static const bool skip = env_is("MVAR_EMU_KERNELS", "skip");
    return skip;
}

// Whether a library prints its counts at exit.
inline bool stats_wanted() { return kernels_skipped() || env_is("MVAR_EMU_STATS", "1"); }

}  // namespace mvar_emu_host_cost
